"""Two nodes: ZeRO-3 training as two torchrun agents (``--nnodes 2``, c10d rendezvous on the first node's address)
on two virtual hosts of this machine (``scripts/virtual_nodes.sh``: a network namespace, hostname, /dev/shm and
/etc/hosts each), one rank per node, the checkpoint folder shared as a cluster file system is.

What it shows: the rendezvous, gloo and DeepSpeed's collectives across two addresses; one mosaicml-streaming local
leader per node, each with shared memory of its own; that two nodes x 1 rank give the one-node x 2 ranks losses
step for step; that killing both agents and their ranks, then starting the same two commands, resumes from the
newest complete checkpoint and goes on with the same losses. What it does not show: separate CPUs, memory or disks,
a real network's latency or loss, or NCCL (the nodes share this machine; the collectives run on gloo).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from machine_support import VIRTUAL_NODES_SCRIPT, unavailable, virtual_nodes_missing
from training_jobs import demo_run_overrides, environment, losses, mlflow_runs

pytestmark = pytest.mark.slow

NODES = ("bgnode1", "bgnode2")
RENDEZVOUS_PORT = 29461


@pytest.fixture(scope="module")
def virtual_nodes() -> tuple[str, ...]:
    """Two virtual hosts; skipped where they cannot be made (not root, no ``ip``), a failure under CI."""
    if why := virtual_nodes_missing():
        unavailable(why)
    proc = subprocess.run(["bash", str(VIRTUAL_NODES_SCRIPT), "up", *NODES], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        unavailable(f"scripts/virtual_nodes.sh up failed: {proc.stderr.strip()[-1500:]}")
    yield NODES
    subprocess.run(["bash", str(VIRTUAL_NODES_SCRIPT), "down", *NODES], capture_output=True, timeout=60)


def start_agents(data_root: Path, run_dir: Path, store: Path, steps: int, extra: list[str]) -> list[subprocess.Popen]:
    """One torchrun agent per virtual node, each with one rank; the rendezvous is on the first node's address."""
    run_dir.mkdir(exist_ok=True)
    agents = []
    for node in NODES:
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={NODES[0]}:{RENDEZVOUS_PORT}", f"--rdzv_id={run_dir.name}",
            "-m", "biomedgpt.train", "--config", "demo", *demo_run_overrides(data_root, run_dir, steps, extra),
        ]  # fmt: skip
        log = open(run_dir / f"{node}.log", "a")  # noqa: SIM115 - closed with the process, by the kernel
        agents.append(
            subprocess.Popen(
                ["bash", str(VIRTUAL_NODES_SCRIPT), "exec", node, *torchrun],
                env=environment(run_dir, store),
                cwd=run_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
    return agents


def node_logs(run_dir: Path) -> str:
    return "\n".join(f"--- {node}\n" + (run_dir / f"{node}.log").read_text()[-4000:] for node in NODES)


def wait_agents(agents: list[subprocess.Popen], run_dir: Path, timeout: float = 600) -> None:
    try:
        codes = [agent.wait(timeout=timeout) for agent in agents]
    except subprocess.TimeoutExpired:
        kill_job(agents)
        raise AssertionError(f"the two-node job did not finish in {timeout} s:\n{node_logs(run_dir)}") from None
    assert codes == [0, 0], node_logs(run_dir)


def kill_job(agents: list[subprocess.Popen]) -> None:
    """SIGKILL both agents, their ranks and the ranks' workers at once: no process gets a chance to save."""
    processes = []
    for agent in agents:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes += [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=60)
    for agent in agents:
        agent.wait(timeout=60)


def wait_for_step(run_dir: Path, step: int, agents: list[subprocess.Popen], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "ckpt" / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        if any(agent.poll() is not None for agent in agents):
            kill_job(agents)
            raise AssertionError(f"an agent exited before step {step}:\n{node_logs(run_dir)}")
        time.sleep(0.2)
    kill_job(agents)
    raise AssertionError(f"step {step} not reached in {timeout} s:\n{node_logs(run_dir)}")


def test_two_nodes_train_like_one_and_resume_after_sigkill(virtual_nodes, data_root, demo_reference, tmp_path):
    """The same job as the session's one-node reference (2 ranks on one node, checkpoints every 2 steps), as two
    nodes of one rank each: killed after step 3, then started again."""
    store, steps, extra = tmp_path / "mlruns.db", demo_reference.steps, demo_reference.extra
    reference = demo_reference.losses

    run_dir = tmp_path / "two_nodes"
    agents = start_agents(data_root, run_dir, store, steps, extra)
    wait_for_step(run_dir, 3, agents)
    kill_job(agents)
    assert (run_dir / "ckpt" / "latest").read_text() == "step_00000002", node_logs(run_dir)

    agents = start_agents(data_root, run_dir, store, steps, extra)
    wait_agents(agents, run_dir)
    log = (run_dir / f"{NODES[0]}.log").read_text()
    resumed = re.search(r"resuming from .* at step (\d+)", log)
    assert resumed is not None and int(resumed.group(1)) == 2, node_logs(run_dir)
    assert (run_dir / "ckpt" / "latest").read_text() == f"step_{steps:08d}"

    continued = losses(run_dir)
    assert sorted(continued) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # dropout on: equality needs the same samples, seeds and optimizer state
        assert continued[step] == pytest.approx(reference[step], rel=1e-5), (step, reference, continued)
    runs = mlflow_runs(store, "biomedgpt-demo")
    assert len(runs) == 1  # the restart continued the two-node job's run
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
