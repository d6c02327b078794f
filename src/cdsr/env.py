"""Offline and quiet defaults for every tool the project drives, and the allocator's settings.

Imported first by the CLI, the flows and the tests, so no tool phones home or prints
telemetry errors on a machine without network (docs/stack.md "Offline settings"). Values already set
in the environment win, so a user can still point a tool elsewhere.

It also keeps glibc's malloc from handing large blocks back to the kernel (:func:`tune_allocator`).
"""

from __future__ import annotations

import ctypes
import os
import sys
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


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = (1 << 31) - 1  # free heap is kept up to 2 GiB (mallopt takes a C int)


def tune_allocator() -> bool:
    """Keep large tensors' memory in the process (glibc only; ``CDSR_MALLOC_TUNING=0`` opts out).

    By default glibc serves blocks above 32 MiB with a fresh ``mmap`` and returns them at
    ``free``, so every large activation of a step, or batch of an evaluation, is zeroed page by
    page by the kernel again: the page faults took about half of a ``full`` evaluation of
    Food-Kitchen by ``abxi`` (the ``fill_``/``copy_`` of [B L, 3 d] buffers; docs/results.md,
    "The allocator"); a training step on 2 idle threads did not change. The fix PyTorch's CPU tuning guide gives is another allocator
    (jemalloc / tcmalloc, by ``LD_PRELOAD``); the same effect within glibc is two ``mallopt``
    calls, here at import. Memory is reused rather than returned, so the resident set stays at
    its peak. No number changes. Returns whether the settings were applied."""
    if os.environ.get("CDSR_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        # the process's own symbols (libc among them): find_library("c") would run ldconfig at
        # every import
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


apply_offline_defaults()
ALLOCATOR_TUNED = tune_allocator()
