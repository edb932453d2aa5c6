"""Launcher variables -> RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE (biomedgpt.runtime.launcher_env)."""

from __future__ import annotations

import pytest

from biomedgpt.runtime.launcher_env import (
    DistributedEnv,
    apply_distributed_env,
    detect_distributed_env,
    distributed_env_updates,
    first_slurm_host,
    slurm_tasks_on_node,
)


def test_single_process_sets_nothing() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert distributed_env_updates(env) == {}
    assert apply_distributed_env(env) == DistributedEnv(0, 0, 1, 1, 0, "none")
    assert env == {"PATH": "/bin"}


def test_torchrun_is_left_alone() -> None:
    env = {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500",
    }
    before = dict(env)
    d = apply_distributed_env(env)
    assert d == DistributedEnv(5, 1, 8, 4, 1, "env")
    assert env == {**before, "NODE_RANK": "1"}
    assert d.num_nodes == 2


def test_deepspeed_launcher_local_size() -> None:
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500",
    }
    assert distributed_env_updates(env) == {"LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"}
    d = apply_distributed_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.node_rank, d.launcher) == (
        3,
        1,
        4,
        2,
        1,
        "deepspeed",
    )
    assert env["LOCAL_WORLD_SIZE"] == "2"


def test_open_mpi() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "6",
        "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "OMPI_COMM_WORLD_NODE_RANK": "1",
    }
    assert distributed_env_updates(env) == {
        "RANK": "6",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
    }
    assert detect_distributed_env(env) == DistributedEnv(6, 2, 8, 4, 1, "mpi")


def _slurm(**extra: str) -> dict[str, str]:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
    }
    env.update(extra)
    return env


def test_slurm_srun() -> None:
    env = _slurm()
    updates = distributed_env_updates(env)
    assert updates == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(15000 + 123456 % 20000),
    }
    assert apply_distributed_env(env) == DistributedEnv(5, 1, 8, 4, 1, "slurm")


def test_slurm_ntasks_per_node_wins_and_uneven_nodes() -> None:
    assert distributed_env_updates(_slurm(SLURM_NTASKS_PER_NODE="4"))["LOCAL_WORLD_SIZE"] == "4"
    assert distributed_env_updates(_slurm(SLURM_TASKS_PER_NODE="4(x2)", SLURM_NODEID="0"))["LOCAL_WORLD_SIZE"] == "4"
    env = _slurm(SLURM_TASKS_PER_NODE="3,1", SLURM_NTASKS="4", SLURM_PROCID="3", SLURM_LOCALID="0")
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        detect_distributed_env(env)


def test_slurm_values_never_override_existing_ones() -> None:
    # An sbatch script that runs torchrun inside an srun step: torchrun's variables are the right ones.
    env = _slurm(RANK="2", LOCAL_RANK="2", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4", MASTER_PORT="1234")
    assert distributed_env_updates(env) == {}
    assert apply_distributed_env(env) == DistributedEnv(2, 2, 4, 4, 0, "env")
    assert env["MASTER_PORT"] == "1234"
    # Partly set: only the missing ones are filled in.
    env = _slurm(MASTER_ADDR="head")
    assert "MASTER_ADDR" not in distributed_env_updates(env)


def test_slurm_batch_script_is_not_a_rank() -> None:
    # The batch script of a --ntasks=8 job is one process; claiming rank 0 of 8 would hang the rendezvous.
    for step in (None, "batch", "4294967294"):
        env = _slurm(SLURM_PROCID="0")
        del env["SLURM_STEP_ID"]
        if step is not None:
            env["SLURM_STEP_ID"] = step
        assert distributed_env_updates(env) == {}
        assert detect_distributed_env(env).launcher == "none"


def test_slurm_parsers() -> None:
    assert [slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    assert slurm_tasks_on_node("2", 7) == 2
    with pytest.raises(ValueError):
        slurm_tasks_on_node("4(x2),3", 3)
    with pytest.raises(ValueError):
        slurm_tasks_on_node("four", 0)
    assert first_slurm_host("node12") == "node12"
    assert first_slurm_host("gpu[003-004,007],cpu1") == "gpu003"
    assert first_slurm_host("a[1,3]") == "a1"


def test_inconsistent_values_are_reported() -> None:
    with pytest.raises(ValueError, match="RANK=4 is outside"):
        detect_distributed_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="LOCAL_RANK=2 is outside"):
        detect_distributed_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        detect_distributed_env({"RANK": "x", "WORLD_SIZE": "4"})


def test_apply_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "LOCAL_SIZE", "CROSS_RANK"):
        # setenv first so monkeypatch restores the original state, including variables apply_distributed_env adds.
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    import os

    d = apply_distributed_env()
    assert d.local_world_size == 2 and os.environ["LOCAL_WORLD_SIZE"] == "2"


def test_unknown_ranks_per_node_warns() -> None:
    with pytest.warns(UserWarning, match="ranks per node"):
        d = detect_distributed_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert (d.local_world_size, d.local_rank, d.node_rank) == (1, 0, 1)
