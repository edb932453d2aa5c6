"""Runs the kernel checks (check_*.py here) in a fresh process with TRITON_INTERPRET=1.

Triton's interpreter works only if that variable is set before triton is first imported, and torch imports triton
early in this process; a fresh process also keeps the variable out of every other test and of what they start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHECKS = sorted(HERE.glob("check_*.py"))


def test_fused_kernels_match_reference_under_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    assert CHECKS, f"no check_*.py files in {HERE}"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *map(str, CHECKS)]
    result = subprocess.run(command, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report
