"""Shared by the tests that launch real training jobs (tests/train, tests/slurm): small-run settings, the launch
command and readers of what a job leaves behind. Importable as ``training_jobs`` (pytest puts tests/ on sys.path
for its conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from biomedgpt.checkpoint.layout import LATEST_FILE, tag_for_step
from biomedgpt.train.cli import free_local_port, torchrun_command

# Tiny images, few patches and 4-row steps keep a 2-rank CPU job to seconds per step.
SMALL = [
    "data.patch_image_size=64",
    "data.sample_patch_num=8",
    "batch.global_batch_size=4",
    "batch.micro_batch_size=2",
    "log_every_steps=1",
    "tracking.system_metrics=false",
]
DETERMINISTIC = ["model.dropout=0.0", "model.encoder_drop_path_rate=0.0", "model.decoder_drop_path_rate=0.0"]


def demo_run_overrides(data_root: Path, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    """The demo preset on the demo data under ``data_root``, ``steps`` steps, checkpoints in ``run_dir``/ckpt,
    small-run settings, then ``extra``."""
    from biomedgpt.demo import demo_overrides

    return demo_overrides(data_root, steps) + [f"checkpoint.dir={run_dir / 'ckpt'}", *SMALL, *extra]


def environment(run_dir: Path, store: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    uri = f"sqlite:///{store or run_dir / 'mlruns.db'}"
    env.update(BIOMEDGPT_NO_PROGRESS="1", MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    return env


def run_training(
    run_dir: Path, config: str, overrides: list[str], nproc: int, store: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a job to its end in ``run_dir`` and fail the test with its output when it does not exit 0."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        torchrun_command(config, overrides, nproc), env=environment(run_dir, store), cwd=run_dir,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metric_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ckpt" / "metrics.jsonl").read_text().splitlines() if line]


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step logged twice (before a kill and after the restart) keeps the last."""
    return {record["step"]: record["loss"] for record in metric_records(run_dir) if "loss" in record}


def mlflow_runs(store: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{store}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {store}"
    return client.search_runs([found.experiment_id])


def torchrun_script(script: str | Path, argument: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a test file as a ``torchrun`` script (its ``__main__`` part) with ``argument``, in that folder; fail the
    test with its output unless it exits 0. tests/ is on its PYTHONPATH for the shared helper modules."""
    port = free_local_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
        str(script), str(argument),
    ]  # fmt: skip
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": tests_dir}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=argument)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.5) -> None:
    """Until the job in ``run_dir`` has logged ``step`` in its metrics.jsonl; fail when it ends first."""
    deadline = time.monotonic() + timeout
    path = run_dir / "ckpt" / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before step {step}")
        time.sleep(poll)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def training_ranks(launcher_pid: int) -> list[psutil.Process]:
    return [
        p for p in psutil.Process(launcher_pid).children(recursive=True) if "biomedgpt.train" in " ".join(p.cmdline())
    ]


def kill_job_after_step(
    command: list[str],
    run_dir: Path,
    step: int,
    store: Path | None = None,
    nproc: int = 2,
    poll: float = 0.5,
    saved: bool = False,
) -> None:
    """Start a job of ``nproc`` ranks (``command``) in a new ``run_dir`` and, once it has logged ``step`` (and, with
    ``saved``, once that step's checkpoint is complete), crash it: the launcher and every rank at once, no chance to
    save. torchrun starts each rank in a session (and process group) of its own, so each group is killed whole: a
    rank's Python resource tracker, left alive, would unlink the rank's shared memory as a crash does not."""
    run_dir.mkdir()
    proc = subprocess.Popen(
        command, env=environment(run_dir, store), cwd=run_dir,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_for_step(run_dir, step, proc, poll=poll)
    latest = run_dir / "ckpt" / LATEST_FILE
    while saved and not (latest.is_file() and latest.read_text() == tag_for_step(step)):
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before its step-{step} checkpoint")
        time.sleep(poll)
    ranks = training_ranks(proc.pid)
    assert len(ranks) == nproc
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for rank in ranks:
        os.killpg(rank.pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(job, timeout=60)
    proc.wait(timeout=60)
