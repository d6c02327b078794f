"""The allocator settings cdsr applies at import (cdsr.env.tune_allocator): applied (mallopt
accepted both) by default on glibc, not applied with CDSR_MALLOC_TUNING=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import cdsr.env as e; print(e.ALLOCATOR_TUNED)"


def _run(tuning: str) -> str:
    env = {**os.environ, "CDSR_MALLOC_TUNING": tuning}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_allocator_is_tuned_by_default_and_can_be_opted_out():
    assert (_run("1"), _run("0")) == ("True", "False")
