"""Shared fixtures: the ../shared data folder (skipped cleanly when absent) and small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers import TINY

import cdsr  # noqa: F401  (offline settings)

# Prefect logs "stopping temporary server" at interpreter exit, after pytest closed its capture
# streams; warnings and errors still show.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CDSR_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available ({SHARED_DATA} is absent)")
    return SHARED_DATA


@pytest.fixture
def in_root(monkeypatch):
    """Run from the project root (params.yaml paths are relative to it)."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A small synthetic dataset named 't', built once per session: <root>/t/processed."""
    from helpers import make_cfg

    from cdsr.data.build import build

    root = tmp_path_factory.mktemp("tiny")
    build(make_cfg(**TINY), root, log=lambda s: None)
    return root


def write_tiny_params(folder: Path) -> Path:
    """The project's params.yaml with the tiny dataset 't' declared (the CLI takes declared
    dataset names only), written to ``folder``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["t"] = TINY
    path = folder / "params-t.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    """:func:`write_tiny_params` into the test's temporary folder."""
    return write_tiny_params(tmp_path)


@pytest.fixture(scope="module")
def tiny_params_module(tmp_path_factory) -> Path:
    """:func:`write_tiny_params`, once for a module's tests that share a run."""
    return write_tiny_params(tmp_path_factory.mktemp("params"))
