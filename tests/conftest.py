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


TINY = {
    "generator": {"users": 200, "items_per_domain": 150, "topics": 6, "malformed_rows": 3, "duplicate_rows": 2},
    "sources": [{"format": "ratings-csv-2014", "path": "{data_root}/t/raw/*.csv"},
                {"format": "amazon-review-json", "path": "{data_root}/t/raw/*.json.gz"}],
    "domains": ["Books", "Movies_and_TV", "CDs_and_Vinyl"],
    "sequences": {"filters": [{"min_user_domains": 2}, {"min_user_events": 5}], "domains_required": "present"},
    "split": {"negatives": {"sampled-100": 100}},
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A small synthetic dataset named 't', built once per session: <root>/t/processed."""
    from helpers import make_cfg

    from cdsr.data.build import build

    root = tmp_path_factory.mktemp("tiny")
    build(make_cfg(**TINY), root, log=lambda s: None)
    return root
