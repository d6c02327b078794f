"""The one JSON writer of run directories and the results store: through a temporary file in
the same directory, so a kill at any point leaves the old file or the new one, never half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    tmp.replace(path)
