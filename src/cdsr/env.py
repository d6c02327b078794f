"""Offline and quiet defaults for every tool the project drives.

Imported first by the CLI, the flows and the tests, so no tool phones home or prints
telemetry errors on a machine without network (docs/stack.md "Offline settings"). Values already set
in the environment win, so a user can still point a tool elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
}


def apply_offline_defaults(project_root: str | os.PathLike | None = None) -> None:
    """Set the offline/quiet variables unless the user already set them."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    root = Path(project_root) if project_root is not None else Path.cwd()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))


apply_offline_defaults()
