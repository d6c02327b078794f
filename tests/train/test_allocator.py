"""The allocator settings cdsr applies at import (cdsr.env.tune_allocator): on by default on
glibc, off with CDSR_MALLOC_TUNING=0, and harmless to the numbers (the same seeded step)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import ctypes, cdsr.env as e; print(e.ALLOCATOR_TUNED); "
         "import torch; torch.manual_seed(0); x = torch.randn(3000, 3000); print(float((x @ x).sum()))")


def _run(tuning: str) -> list[str]:
    env = {**os.environ, "CDSR_MALLOC_TUNING": tuning}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_allocator_is_tuned_by_default_and_can_be_opted_out():
    on, off = _run("1"), _run("0")
    assert on[0] == "True" and off[0] == "False"
    assert on[1] == off[1]  # a 36 MB product computed from heap memory or fresh pages: the same bits
