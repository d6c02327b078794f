"""When and for how long a data stage ran, kept out of the stage's DVC outputs.

The stages' reports (``interim/ingest_report.json``, ``*/validation/``) are DVC outputs and
metrics, so they hold only what the data and the parameters determine: two runs on the same
input write the same bytes, and ``dvc repro`` in a fresh clone leaves dvc.lock unchanged. The
wall times go to a ``*_timing.json`` file next to them that DVC does not track (git ignores it
with the rest of ``data/``)::

    interim/ingest_timing.json           ingest
    interim/validation_timing.json       validate (interactions)
    processed/validation_timing.json     sequences (validation of the sequence tables)
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path


def write_timing(path: Path, t0: float) -> dict[str, object]:
    """Write ``{"started_at": ISO UTC time of t0, "elapsed_s": seconds since t0}`` to ``path``."""
    timing: dict[str, object] = {
        "started_at": dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "elapsed_s": round(time.time() - t0, 3),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing, indent=2) + "\n")
    return timing
