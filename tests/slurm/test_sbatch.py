"""slurm/pretrain.sbatch submitted with ``sbatch`` to a real SLURM (a single-node cluster on localhost).

A tiny 2-rank CPU job (``--gpus-per-node=0``, ``CPU_PROCS_PER_NODE=2``) goes through the same path a GPU job does:
batch shell -> srun (one task per node) -> torchrun (c10d rendezvous on the first node) -> ranks. The preemption
test sends SIGUSR1 to the batch shell, as ``#SBATCH --signal=B:USR1@N`` does before the time limit, and checks that
the job checkpoints, requeues itself, resumes and finishes in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from training_jobs import SMALL

from biomedgpt.demo import demo_overrides, prepare_demo_data

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "pretrain.sbatch"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_data")
    prepare_demo_data(root, rows=16, image_size=64)
    return root


def sbatch(template: Path, run_dir: Path, partition: str, variables: dict[str, str], *options: str) -> str:
    """``sbatch TEMPLATE`` from ``run_dir`` with the template's variables in the environment; the job id."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlruns.db'}", **variables}
    command = [
        "sbatch", "--parsable", f"--partition={partition}", "--gpus-per-node=0", "--cpus-per-task=2", "--time=20",
        "--job-name=biomedgpt-test", *options, str(template),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def submit(
    run_dir: Path, data_root: Path, partition: str, steps: int, every: int, nodes: int = 1, *options: str
) -> str:
    """``sbatch slurm/pretrain.sbatch`` running the demo pretraining for ``steps`` steps on 2 ranks in all."""
    overrides = [o for o in demo_overrides(data_root, steps) if not o.startswith("checkpoint.dir=")]
    variables = dict(
        CONFIG="demo",
        OVERRIDES=" ".join([*overrides, *SMALL, f"checkpoint.every_steps={every}"]),
        CHECKPOINT_DIR=str(run_dir / "ckpt"),
        CPU_PROCS_PER_NODE=str(2 // nodes),
    )
    return sbatch(TEMPLATE, run_dir, partition, variables, f"--nodes={nodes}", *options)


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"biomedgpt-test-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_for_job(run_dir: Path, job_id: str, timeout: float = 420) -> dict[str, str]:
    """Poll ``scontrol show job`` (no accounting needed) until the job ends; a requeued job is started at once
    instead of after SLURM's ~2 minute requeue delay (BeginTime)."""
    deadline = time.monotonic() + timeout
    requeued_at = None
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        state = fields.get("JobState", "")
        if state in DONE_STATES:
            return fields
        if state == "PENDING" and fields.get("Reason") == "BeginTime" and int(fields.get("Restarts", "0")) > 0:
            # Not at once: started before slurmd has cleaned up the previous run, the job fails with "Job
            # credential revoked" (seen once); a few seconds are enough, SLURM's own delay is ~2 minutes.
            requeued_at = requeued_at or time.monotonic()
            if time.monotonic() - requeued_at > 10:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(2)
    subprocess.run(["scancel", job_id], capture_output=True)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s; log:\n{log_of(run_dir, job_id)[-4000:]}")


def wait_for_step(run_dir: Path, job_id: str, step: int, timeout: float = 300, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "ckpt" / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        if job_fields(job_id).get("JobState") in DONE_STATES:
            raise AssertionError(f"job ended before step {step}:\n{log_of(run_dir, job_id)[-4000:]}")
        time.sleep(poll)
    subprocess.run(["scancel", job_id], capture_output=True)
    raise AssertionError(f"step {step} not reached in {timeout} s:\n{log_of(run_dir, job_id)[-4000:]}")


def logged_steps(run_dir: Path) -> set[int]:
    return {json.loads(x)["step"] for x in (run_dir / "ckpt" / "metrics.jsonl").read_text().splitlines() if x}


def mlflow_runs(run_dir: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{run_dir / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("biomedgpt-demo")
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id])


def test_pretrain_sbatch_runs_to_the_end(slurm_cluster, data_root, tmp_path):
    job_id = submit(tmp_path, data_root, slurm_cluster, steps=4, every=2)
    fields = wait_for_job(tmp_path, job_id)
    log = log_of(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    assert "1 node(s) x 2 rank(s)" in log
    assert "training finished at step 4" in log
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000004"
    assert (tmp_path / "ckpt" / "step_00000004" / "COMPLETE").is_file()
    assert logged_steps(tmp_path) == {1, 2, 3, 4}

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (tmp_path / "ckpt" / "mlflow_run_id").read_text().strip()
    assert run.data.params["world_size"] == "2"
    assert run.data.tags["slurm.job_id"] == job_id
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {1, 2, 3, 4}


def test_missing_inputs_fail_the_job_before_srun(slurm_cluster, data_root, tmp_path):
    """job_prep.py checks the config's paths in the batch shell: the job fails with their keys, no step starts."""
    missing = tmp_path / "no_text"
    overrides = [o for o in demo_overrides(data_root, 2) if not o.startswith(("checkpoint.dir=", "data.text="))]
    variables = dict(
        CONFIG="demo",
        OVERRIDES=" ".join([*overrides, f"data.text={missing}", *SMALL]),
        CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        CPU_PROCS_PER_NODE="2",
    )
    job_id = sbatch(TEMPLATE, tmp_path, slurm_cluster, variables)
    fields = wait_for_job(tmp_path, job_id, timeout=180)
    log = log_of(tmp_path, job_id)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", log[-4000:]
    assert f"data.text={missing}: does not exist; convert the TSV with biomedgpt-convert" in log
    assert "names inputs that are missing (message above); nothing was started" in log
    assert "step finished" not in log and not (tmp_path / "ckpt").exists()


def test_continued_pretrain_sbatch_runs_the_causal_lm_recipe(slurm_cluster, tmp_path):
    """slurm/continued_pretrain.sbatch: with its defaults (CONFIG=continued_pretrain_7b, a model directory and token
    shards not in place) the batch shell names both and starts nothing; with the tiny preset on token shards and a
    held-out split it trains on 2 ranks to the end, validating perplexity."""
    from transformers import LlamaTokenizer

    from biomedgpt.data.documents import convert_documents

    template = REPO / "slurm" / "continued_pretrain.sbatch"
    default = tmp_path / "default"
    job_id = sbatch(template, default, slurm_cluster, {"CHECKPOINT_DIR": str(default / "ckpt")})
    fields, log = wait_for_job(default, job_id, timeout=180), log_of(default, job_id)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", log[-4000:]
    assert "data.train=data/pmc_tokens: " in log and "model.path=models/Llama-2-7b-chat-hf: no config.json" in log
    assert "step finished" not in log and not (default / "ckpt").exists()

    tokenizer, assets = tmp_path / "tokenizer", REPO / "biomedgpt" / "assets" / "tokenizer"
    LlamaTokenizer(vocab_file=str(assets / "spm.model"), legacy=False).save_pretrained(tokenizer)
    texts = (assets / "corpus.txt").read_text().splitlines()[:60]
    for name, lines in (("train", texts[:50]), ("valid", texts[50:])):
        (tmp_path / f"{name}.txt").write_text(" ".join(lines))
        convert_documents([tmp_path / f"{name}.txt"], tmp_path / name, tokenizer, seq_len=32, keep_document_ids=True)
    overrides = [
        f"data.train={tmp_path / 'train'}", f"data.tokenizer={tokenizer}", f"validation.data={tmp_path / 'valid'}",
        "validation.every_steps=2", "optim.max_steps=4", "checkpoint.every_steps=2", "tracking.system_metrics=false",
    ]  # fmt: skip
    variables = {"CONFIG": "causal_lm_tiny", "OVERRIDES": " ".join(overrides), "CHECKPOINT_DIR": str(tmp_path / "ckpt"),
                 "CPU_PROCS_PER_NODE": "2"}  # fmt: skip
    job_id = sbatch(template, tmp_path, slurm_cluster, variables)
    fields, log = wait_for_job(tmp_path, job_id), log_of(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    assert "1 node(s) x 2 rank(s)" in log and "training finished at step 4" in log
    assert re.search(r"validation at step 4: perplexity=[\d.]+", log), log[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000004" and logged_steps(tmp_path) == {1, 2, 3, 4}


def training_ranks(job_id: str) -> list[psutil.Process]:
    """The job's ranks on every node (the nodes share this machine's process table): torchrun's children."""
    ranks = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = process.environ()
            if (
                env.get("SLURM_JOB_ID") == job_id
                and "LOCAL_RANK" in env
                and "LOCAL_RANK" not in process.parent().environ()
            ):
                ranks.append(process)
    return ranks


def signal_pending(process: psutil.Process, signum: int) -> bool:
    """``signum`` is pending for the (stopped) process: bit signum-1 of ShdPnd in /proc/PID/status."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    pending = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(pending >> (signum - 1) & 1)


def test_usr1_on_two_nodes_checkpoints_requeues_and_resumes_in_the_same_mlflow_run(
    two_node_partition, data_root, tmp_path
):
    """The preemption path on a two-node job (two slurmd hosts): SIGUSR1 to the batch shell reaches both nodes'
    ranks through srun and launch.sh, they agree on a step, save, exit 0, the job requeues itself and resumes.

    No timing window: once step 2 is logged the ranks are frozen (SIGSTOP), the signal is sent and the test waits
    until it is pending on both ranks, then lets them go on. They stop at the step they were in (or, when frozen
    just after agreeing on that step, at the next), whatever the speed of the machine."""
    steps = 6
    job_id = submit(tmp_path, data_root, two_node_partition, steps, 100, 2)  # only the signal's checkpoint
    try:
        wait_for_step(tmp_path, job_id, 2, poll=0.1)
        ranks = training_ranks(job_id)
        assert len(ranks) == 2, (ranks, log_of(tmp_path, job_id)[-4000:])
        for rank in ranks:
            rank.suspend()
        frozen_at = max(logged_steps(tmp_path))
        assert frozen_at <= steps - 2, f"the job ran to step {frozen_at} of {steps} before it could be frozen"
        # What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit: SIGUSR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while not all(signal_pending(rank, signal.SIGUSR1) for rank in ranks):
            assert time.monotonic() < deadline, "SIGUSR1 did not reach both ranks:\n" + log_of(tmp_path, job_id)
            time.sleep(0.2)
        for rank in ranks:
            rank.resume()
        fields = wait_for_job(tmp_path, job_id)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)  # no-op when the job is done
    log = log_of(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    assert fields["Restarts"] == "1", log[-4000:]
    assert "2 node(s) x 1 rank(s)" in log and "bgslurm[1-2]" in log

    assert "batch shell got SIGUSR1" in log
    assert "checkpoint saved, exiting 0" in log  # the ranks stopped cleanly
    stopped = re.search(rf"stopped at step (\d+) of {steps}; requeueing job", log)
    assert stopped is not None, log[-4000:]
    stopped_at = int(stopped.group(1))
    assert stopped_at in (frozen_at, frozen_at + 1), (frozen_at, log[-4000:])
    assert "start 1 on" in log and "start 2 on" in log  # --open-mode=append: both starts in one log
    resumed = re.search(r"resuming from .* at step (\d+)", log)
    assert resumed is not None and int(resumed.group(1)) == stopped_at, log[-4000:]
    assert f"training finished at step {steps}" in log
    assert (tmp_path / "ckpt" / "latest").read_text() == f"step_{steps:08d}"
    assert logged_steps(tmp_path) == set(range(1, steps + 1))

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1  # the requeued start continued the run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (tmp_path / "ckpt" / "mlflow_run_id").read_text().strip()
    assert run.data.params["world_size"] == "2"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, steps + 1))


def test_finetune_then_evaluate_sbatch_chain(slurm_cluster, data_root, tmp_path):
    """finetune.sbatch (NLI preset, validation keeping the best model) and evaluate.sbatch on that best model,
    submitted together with a SLURM dependency, as a user chains them."""
    converted = data_root / "converted"
    overrides = [
        "model.size=tiny", "model.init_from=null", "data.tokenizer=null", "data.allow_demo_tokenizer=true",
        f"data.train={converted / 'nli_train'}",
        "precision=fp32", "deepspeed_config=zero3_cpu.json", "optim.max_steps=2", "checkpoint.every_steps=2",
        f"validation.data={converted / 'nli_val'}", "validation.every_steps=2", *SMALL,
    ]  # fmt: skip
    finetune = sbatch(
        REPO / "slurm" / "finetune.sbatch", tmp_path, slurm_cluster,
        dict(CONFIG="finetune_nli", OVERRIDES=" ".join(overrides), CHECKPOINT_DIR=str(tmp_path / "ckpt"),
             CPU_PROCS_PER_NODE="2"),
    )  # fmt: skip
    evaluation = sbatch(
        REPO / "slurm" / "evaluate.sbatch", tmp_path, slurm_cluster,
        dict(MODEL=str(tmp_path / "ckpt" / "best"), TASK="nli", DATA=str(converted / "nli_test"),
             OUT=str(tmp_path / "eval")),
        f"--dependency=afterok:{finetune}",
    )  # fmt: skip
    try:
        trained = wait_for_job(tmp_path, finetune)
        evaluated = wait_for_job(tmp_path, evaluation)
    finally:
        subprocess.run(["scancel", finetune, evaluation], capture_output=True)
    assert trained["JobState"] == "COMPLETED", log_of(tmp_path, finetune)[-4000:]
    assert "validation at step 2: accuracy=" in log_of(tmp_path, finetune)
    assert evaluated["JobState"] == "COMPLETED", log_of(tmp_path, evaluation)[-4000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    from biomedgpt.evaluation.runner import iter_rows

    assert metrics["task"] == "nli" and metrics["count"] == len(list(iter_rows(converted / "nli_test")))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    evaluations = client.search_runs([client.get_experiment_by_name("biomedgpt-eval").experiment_id])
    assert len(evaluations) == 1 and evaluations[0].data.metrics["accuracy"] == metrics["accuracy"]
