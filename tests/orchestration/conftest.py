"""Fixtures shared by the orchestration tests that talk to a real Prefect server."""

from __future__ import annotations

from pathlib import Path

import pytest
import servers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on 127.0.0.1:<free port> with its own database, one per test module;
    yields ``(api_url, log)``."""
    with servers.prefect_server(tmp_path_factory.mktemp("prefect-server"), cwd=ROOT) as (api, log):
        yield api, log
