"""Prefect's temporary API server, tied to the life of the process that needs it.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server (a uvicorn subprocess) the
first time a flow runs, and stops it at interpreter exit. A process killed with SIGKILL runs no
exit handler, so that server used to outlive it for good (one orphan per killed `cdsr tune`).

:func:`start_temporary_server` starts that same server (Prefect's own singleton, which every
later Prefect client reuses) from the calling thread, with the kernel told to send it SIGTERM
when its parent dies (Linux ``PR_SET_PDEATHSIG``), whatever the way the parent dies. Call it
from the main thread, early: the death signal follows the thread that started the child.
Elsewhere (another OS, or a configured API server) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Any

PR_SET_PDEATHSIG = 1


class _TiedSubprocess:
    """The ``subprocess`` module as Prefect's server module sees it: ``Popen`` starts children
    that get SIGTERM when this process dies; everything else is the real module."""

    def __init__(self) -> None:
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
        self._parent = os.getpid()

    def _preexec(self) -> None:
        self._prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self._parent:  # the parent died before the line above took effect
            os._exit(1)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:  # the name of the module function it stands for
        kwargs.setdefault("preexec_fn", self._preexec)
        return subprocess.Popen(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def start_temporary_server() -> str | None:
    """Start Prefect's temporary API server now, tied to this process (see the module doc).

    Returns its API URL, or None when nothing was started (an API server is configured, or the
    platform has no parent-death signal)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api import server as prefect_server

    if not isinstance(prefect_server.subprocess, _TiedSubprocess):
        prefect_server.subprocess = _TiedSubprocess()
    srv = prefect_server.SubprocessASGIServer()  # the singleton Prefect's clients use
    srv.start()
    return srv.api_url
