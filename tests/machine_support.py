"""What a test needs from this machine beyond Python (root, iproute2, SLURM): where it is missing the test is skipped
with the reason, except under CI, which has all of it, where it fails."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

VIRTUAL_NODES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "virtual_nodes.sh"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(why: str) -> NoReturn:
    """Skip the test, or fail it under CI."""
    if in_ci():
        pytest.fail(why)
    pytest.skip(why)


def virtual_nodes_missing() -> str | None:
    """Why ``scripts/virtual_nodes.sh`` cannot make nodes here, or None."""
    if os.geteuid() != 0:
        return "virtual nodes need root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "virtual nodes need iproute2 (ip) and util-linux (unshare)"
    return None
