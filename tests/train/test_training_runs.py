"""Real training jobs: torchrun with 2 CPU ranks, DeepSpeed ZeRO-3 (gloo), streamed Parquet data, MLflow (SQLite).

These launch the same command a user runs (``python -m biomedgpt.train --config demo ...``) and check the
promises of the training issue: rank-count independence, exact continuation after SIGKILL, SIGTERM handling and
one MLflow run per job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from training_jobs import (
    DETERMINISTIC,
    demo_run_overrides,
    environment,
    kill_job_after_step,
    losses,
    metric_records,
    mlflow_runs,
    run_training,
    training_ranks,
    wait_for_step,
)

from biomedgpt.train.cli import free_local_port, torchrun_command

pytestmark = pytest.mark.slow


def command(data_root: Path, run_dir: Path, nproc: int, steps: int, extra: list[str]) -> list[str]:
    return torchrun_command("demo", demo_run_overrides(data_root, run_dir, steps, extra), nproc)


def run(
    data_root: Path, run_dir: Path, nproc: int, steps: int, extra: list[str] = (), store: Path | None = None
) -> subprocess.CompletedProcess:
    return run_training(run_dir, "demo", demo_run_overrides(data_root, run_dir, steps, list(extra)), nproc, store)


def crash_after_step(
    step: int,
    data_root: Path,
    run_dir: Path,
    steps: int,
    extra: list[str],
    store: Path | None = None,
    saved: bool = False,
) -> None:
    """The demo job of ``command``, killed with SIGKILL once it has logged ``step`` (with ``saved``: and completed
    that step's checkpoint); see training_jobs."""
    kill_job_after_step(command(data_root, run_dir, 2, steps, extra), run_dir, step, store, poll=0.05, saved=saved)


def runs_of(run_dir: Path, store: Path | None = None) -> list:
    return mlflow_runs(store or run_dir / "mlruns.db", "biomedgpt-demo")


def test_two_ranks_match_one_rank_with_the_same_global_batch(data_root, tmp_path):
    """The same global batch of 8 rows split two ways: 2 ranks x 1 micro-batch of 4 and 1 rank x 4 micro-batches of
    2. Losses and gradient norms per step must agree: a loss normalised per micro-batch instead of over the global
    batch (1 against 4 micro-batches per rank), or gradients summed instead of averaged across ranks (2 against 1),
    changes them (the gradient norm shows a constant factor that AdamW and clipping would hide from the losses)."""
    # Dropout and drop-path off, ResNet BatchNorm frozen: the only difference is how the batch is split.
    extra = [*DETERMINISTIC, "model.resnet_norm=frozen", "batch.global_batch_size=8"]
    splits = {"2x4": (2, 4), "1x2x4": (1, 2)}
    records = {}
    for name, (nproc, micro) in splits.items():
        run(data_root, tmp_path / name, nproc=nproc, steps=3, extra=[*extra, f"batch.micro_batch_size={micro}"])
        records[name] = {r["step"]: r for r in metric_records(tmp_path / name) if "loss" in r}
    reference = records["2x4"]
    assert sorted(reference) == [1, 2, 3]
    for name, steps in records.items():
        assert sorted(steps) == [1, 2, 3], name
        for step in steps:
            for key in ("loss", "grad_norm"):
                assert steps[step][key] == pytest.approx(reference[step][key], rel=1e-4), (name, step, key)
    assert reference[1]["loss"] != reference[2]["loss"]  # the steps saw different batches


def test_sigkill_then_same_command_continues_exactly(data_root, demo_reference, tmp_path):
    """Killed after step 3 (checkpoints at steps 1, 2 and 3), the newest checkpoint then damaged: the same command
    warns, resumes from the previous one, frees the killed job's shared memory and gives the uninterrupted job's
    losses (the session's reference job), in the killed job's MLflow run. (Resuming from the newest checkpoint
    itself: the two-node test and the other recipes' SIGKILL tests.)"""
    from biomedgpt.cli.compare import main as compare_main

    killed_dir, store, steps = tmp_path / "killed", demo_reference.store, demo_reference.steps
    reference_run = runs_of(demo_reference.run_dir, store)[0].info.run_id
    # A checkpoint every step (the reference saves every 2: saving draws no random numbers and moves no data).
    extra = [*demo_reference.extra, "checkpoint.every_steps=1"]
    crash_after_step(3, data_root, killed_dir, steps, extra, store, saved=True)
    assert max(losses(killed_dir)) == 3  # killed before step 4 (about 2 s here) could end the job
    newest = (killed_dir / "ckpt" / "latest").read_text()
    assert newest == "step_00000003", newest
    states = sorted((killed_dir / "ckpt" / newest).glob("*optim_states.pt"))[0]
    states.write_bytes(states.read_bytes()[:100])
    resumed = run(data_root, killed_dir, nproc=2, steps=steps, extra=extra, store=store)
    assert "could not be loaded" in resumed.stderr and "trying the previous one" in resumed.stderr
    assert re.search(r"resuming from .* at step 2", resumed.stdout), resumed.stdout[-3000:]
    # The killed job left its streaming blocks in /dev/shm (nobody unlinks them); the restart freed them.
    assert re.search(r"freed \d+ shared-memory blocks that killed runs left", resumed.stdout), resumed.stdout[-3000:]

    reference, continued = demo_reference.losses, losses(killed_dir)
    assert sorted(continued) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # dropout is on: equality needs the restored data position, optimizer and seeds
        assert continued[step] == pytest.approx(reference[step], rel=1e-5), (step, reference, continued)

    runs = runs_of(killed_dir, store)
    killed_run = next(r for r in runs if r.info.run_id != reference_run)
    assert len(runs) == 2  # one per job: the restart continued the killed job's MLflow run
    assert killed_run.info.status == "FINISHED"
    assert killed_run.data.params["config.optim.max_steps"] == str(steps)
    assert killed_run.data.params["world_size"] == "2"
    assert "versions.deepspeed" in killed_run.data.params and "git.commit" in killed_run.data.params
    assert killed_run.data.tags["size"] == "tiny" and killed_run.data.tags["task"] == "pretrain"
    history = MlflowClient(f"sqlite:///{store}").get_metric_history(killed_run.info.run_id, "loss")
    assert {m.step for m in history} == set(range(1, steps + 1))
    for name in ("lr", "grad_norm", "samples_per_second", "tokens_per_second", "data_wait", "step_time"):
        assert name in killed_run.data.metrics, name
    assert any(key.startswith("loss/") for key in killed_run.data.metrics)
    # The comparison tool agrees, on the real store: the interrupted job's curves equal the uninterrupted one's.
    compare_args = [reference_run, killed_run.info.run_id, "--tracking-uri", f"sqlite:///{store}", "-q"]
    assert compare_main([*compare_args, "--metrics", "loss", "lr", "--assert-equal", "--rtol", "1e-5"]) == 0


def start_stoppable_job(data_root: Path, run_dir: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A 40-step job without periodic checkpoints, past its second step: torchrun and its two ranks."""
    run_dir.mkdir()
    proc = subprocess.Popen(
        command(data_root, run_dir, 2, 40, ["checkpoint.every_steps=100"]), env=environment(run_dir), cwd=run_dir,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_step(run_dir, 2, proc)
    ranks = training_ranks(proc.pid)
    assert len(ranks) == 2
    return proc, ranks


def assert_stopped_with_a_checkpoint(run_dir: Path, output: str) -> int:
    """The step the job stopped at, after checking it saved there and marked its MLflow run KILLED."""
    assert "checkpoint saved, exiting 0" in output, output[-4000:]
    stopped_at = max(losses(run_dir))
    assert stopped_at < 40
    assert (run_dir / "ckpt" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert runs_of(run_dir)[0].info.status == "KILLED"
    return stopped_at


def test_sigterm_saves_exits_zero_and_the_deepspeed_launcher_resumes(data_root, tmp_path):
    """SIGTERM to one rank: the ranks agree on a step, save, mark the run KILLED and exit 0. The next start goes
    through the deepspeed launcher (the same entry point; it exports LOCAL_SIZE, not LOCAL_WORLD_SIZE, which the
    entry point maps for streaming) and resumes the same MLflow run."""
    run_dir = tmp_path / "preempted"
    proc, ranks = start_stoppable_job(data_root, run_dir)
    ranks[-1].send_signal(signal.SIGTERM)  # one rank only: the ranks must agree among themselves
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    stopped_at = assert_stopped_with_a_checkpoint(run_dir, output)

    overrides = demo_run_overrides(data_root, run_dir, stopped_at + 2, [])
    launcher = Path(sys.executable).parent / "deepspeed"
    resumed = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_local_port()), "--module", "biomedgpt.train",
         "--config", "demo", *overrides],
        env=environment(run_dir), cwd=run_dir, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert sorted(losses(run_dir)) == list(range(1, stopped_at + 3))
    runs = runs_of(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_ranks_stop_with_a_checkpoint_when_torchrun_is_killed(data_root, tmp_path):
    run_dir = tmp_path / "orphaned"
    proc, ranks = start_stoppable_job(data_root, run_dir)
    os.kill(proc.pid, signal.SIGKILL)  # torchrun only: its ranks live on in sessions of their own
    output, _ = proc.communicate(timeout=600)  # the ranks hold the pipe until they exit
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, output[-4000:]
    assert f"the launcher (pid {proc.pid}) has exited" in output, output[-4000:]
    assert_stopped_with_a_checkpoint(run_dir, output)
