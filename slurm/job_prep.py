"""Batch-shell helper of ``slurm/launch.sh``: resolve the run config once per job start, before any rank runs.

``python slurm/job_prep.py --config NAME_OR_PATH [--mlflow] [key=value ...]`` prints ``key=value`` lines that the
launch script reads:

* ``checkpoint_dir`` (absolute), ``max_steps`` and ``latest_step`` (the newest *complete* checkpoint, 0 if none):
  the launch script requeues only while ``latest_step < max_steps``;
* with ``--mlflow``: ``mlflow_run_id`` and ``tracking_uri``. The run id is kept in ``<checkpoint_dir>/mlflow_run_id``:
  the first start of a job creates the run (status SCHEDULED) and writes the file, every later start (a requeue,
  a resubmission with the same checkpoint dir) reads it back. The launch script exports it as ``MLFLOW_RUN_ID``,
  which the trainer's tracker reopens, so every rank and every restart logs to one run, even one killed before
  its first checkpoint. Deleting the checkpoint dir starts a new run, as it starts a new training.

A config error exits 2 with the trainer's own message (unknown keys, impossible values) before SLURM starts any
step. An unreachable tracking server is reported and leaves ``mlflow_run_id`` empty: training goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RUN_ID_FILE = "mlflow_run_id"


def latest_step(checkpoint_dir: Path) -> int:
    from biomedgpt.train.checkpointing import complete_tags, step_of_tag

    tags = complete_tags(checkpoint_dir)
    return (step_of_tag(tags[0]) or 0) if tags else 0


def tracking_uri_for(configured: str | None) -> str:
    from biomedgpt.tracking.mlflow_tracker import default_tracking_uri

    return configured or default_tracking_uri()


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The experiment, created as the trainer's tracker creates it (artifacts next to an SQLite database)."""
    from mlflow.exceptions import MlflowException

    from biomedgpt.tracking.params import sanitize_key

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        if db and db != ":memory:":
            location = (Path(db).resolve().parent / "mlruns" / sanitize_key(name).replace("/", "_")).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def mlflow_run_id(config, checkpoint_dir: Path, tracking_uri: str) -> str:
    """The job's run id: read from ``<checkpoint_dir>/mlflow_run_id``, or a new SCHEDULED run written there."""
    path = checkpoint_dir / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    # Fail fast instead of MLflow's minutes of retries when a server is down; the trainer warns again itself.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    section = config.tracking
    job_name = os.environ.get("SLURM_JOB_NAME", "job")
    run_name = section.run_name or f"{job_name}-{os.environ.get('SLURM_JOB_ID', 'local')}"
    tags = {"slurm.job_id": os.environ.get("SLURM_JOB_ID", ""), "slurm.job_name": job_name}
    run = client.create_run(experiment_id(client, section.experiment, tracking_uri), run_name=run_name, tags=tags)
    client.update_run(run.info.run_id, status="SCHEDULED")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run.info.run_id + "\n")
    tmp.replace(path)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--mlflow", action="store_true", help="create or read the job's MLflow run id")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from biomedgpt.config_utils import ConfigError, load_config
    from biomedgpt.train.config import TrainConfig, preset_paths

    try:
        config = load_config(TrainConfig, args.config, args.overrides, presets=preset_paths())
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"job_prep: config error: {error}", file=sys.stderr)
        return 2
    checkpoint_dir = Path(config.checkpoint.dir).resolve()
    lines = {
        "checkpoint_dir": str(checkpoint_dir),
        "max_steps": str(config.optim.max_steps),
        "latest_step": str(latest_step(checkpoint_dir)),
    }
    if args.mlflow and config.tracking.enabled:
        uri = tracking_uri_for(config.tracking.tracking_uri)
        lines["tracking_uri"] = uri
        try:
            lines["mlflow_run_id"] = mlflow_run_id(config, checkpoint_dir, uri)
        except Exception as error:  # the tracker copes with an unreachable store; so does the job
            print(f"job_prep: warning: no MLflow run created in {uri}: {error}", file=sys.stderr)
            lines["mlflow_run_id"] = ""
    for key, value in lines.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
