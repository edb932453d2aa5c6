"""A real single-node SLURM cluster on localhost (``scripts/slurm_localhost.sh``) for the sbatch template tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from machine_support import unavailable

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_localhost.sh"
VIRTUAL_NODES = ("bgslurm1", "bgslurm2")
VIRTUAL_PARTITION = "virtual"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slurm: submits jobs to a local SLURM cluster (scripts/slurm_localhost.sh)")


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Start (or reuse) the local cluster; skip with the reason when it cannot be started here."""
    if os.environ.get("BIOMEDGPT_SKIP_SLURM"):
        pytest.skip("BIOMEDGPT_SKIP_SLURM is set")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (scripts/slurm_localhost.sh installs and starts daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no SLURM (sbatch) and no apt-get to install slurm-wlm")
    # Two virtual nodes beside this machine's (partition `virtual`) for the two-node job; one configuration for all.
    env = {**os.environ, "SLURM_LOCALHOST_VIRTUAL_NODES": str(len(VIRTUAL_NODES))}
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        # CI runs as root with apt reachable: a cluster that does not come up there is a failure, not a skip.
        unavailable(f"scripts/slurm_localhost.sh could not start SLURM: {proc.stderr.strip()[-1500:]}")
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    return partition[0].rstrip("*") if partition else "debug"


@pytest.fixture(scope="session")
def two_node_partition(slurm_cluster: str) -> str:
    """The partition of the two virtual nodes (each a slurmd on a host of scripts/virtual_nodes.sh)."""
    nodes = subprocess.run(
        ["sinfo", "-h", "-p", VIRTUAL_PARTITION, "-N", "-o", "%N %T"], capture_output=True, text=True
    ).stdout.split("\n")
    states = dict(line.split() for line in nodes if line.strip())
    if sorted(states) != sorted(VIRTUAL_NODES) or not all(s in ("idle", "mixed") for s in states.values()):
        unavailable(f"partition {VIRTUAL_PARTITION} does not have the two virtual nodes idle: {states}")
    return VIRTUAL_PARTITION
