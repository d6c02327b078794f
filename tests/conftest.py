"""Shared fixtures: the ../shared data folder (skipped cleanly when absent) and small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
