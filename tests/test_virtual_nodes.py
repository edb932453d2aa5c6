"""scripts/virtual_nodes.sh called by several callers at once, as ``make test``'s parallel workers do (the two-node
test and the SLURM cluster's virtual nodes): every node gets an address of its own, and ``down NAME...`` removes
only the named nodes."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from machine_support import VIRTUAL_NODES_SCRIPT, unavailable, virtual_nodes_missing

NAMES = [f"bgvtest{i}" for i in range(1, 5)]


def nodes_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(VIRTUAL_NODES_SCRIPT), *args], capture_output=True, text=True, timeout=120)


def listed() -> dict[str, str]:
    return dict(line.split() for line in nodes_script("list").stdout.splitlines() if line.strip())


@pytest.fixture
def test_nodes():
    if why := virtual_nodes_missing():
        unavailable(why)
    yield NAMES
    nodes_script("down", *NAMES)


def test_callers_at_once_get_distinct_addresses_and_remove_only_their_own_nodes(test_nodes):
    before = listed()
    with ThreadPoolExecutor(len(test_nodes)) as pool:
        ups = list(pool.map(lambda name: nodes_script("up", name), test_nodes))
    assert all(proc.returncode == 0 for proc in ups), [proc.stderr for proc in ups]
    printed = dict(proc.stdout.split() for proc in ups)  # each caller is told its node's address
    nodes = listed()
    assert {name: nodes.get(name) for name in test_nodes} == printed
    assert len(set(nodes.values())) == len(nodes), nodes  # no address given twice
    hosts = Path("/run/biomedgpt-virtual-nodes/hosts").read_text()
    assert all(f"{address} {name}" in hosts for name, address in printed.items()), hosts

    with ThreadPoolExecutor(2) as pool:
        downs = list(pool.map(lambda names: nodes_script("down", *names), (test_nodes[:2], test_nodes[2:])))
    assert all(proc.returncode == 0 for proc in downs), [proc.stderr for proc in downs]
    assert listed() == before  # the nodes of other callers (a SLURM test cluster's) are still there
