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
step; so do, with ``--check-inputs``, missing data directories, tokenizer, answers, negative-sample files or
``model.init_from`` (all of them named in one message, as ``biomedgpt-train`` reports them). An unreachable tracking
server is reported and leaves ``mlflow_run_id`` empty: training goes on. An SQLite MLflow store on a network
filesystem (NFS, Lustre, GPFS, ...) is warned about: SQLite's file locking is unreliable there and many jobs
writing to one database end in "database is locked" errors or a corrupt store.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

RUN_ID_FILE = "mlflow_run_id"
NOTHING_STARTED = "Nothing was started (no srun step, no MLflow run)."
# Filesystem types (as /proc/mounts names them) shared between nodes over the network.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "panfs", "afs",
     "orangefs", "pvfs2", "wekafs", "fuse.glusterfs", "fuse.cephfs", "fuse.sshfs", "fuse.beegfs", "fuse.weka"}
)  # fmt: skip


def _unescape_mount_field(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def filesystem_type(path: Path, mounts: Path = Path("/proc/mounts")) -> str | None:
    """The type of the filesystem that holds (or will hold) ``path``: the mount with the longest mount point above
    it in ``mounts``. None when that cannot be read (not Linux)."""
    path, missing = path.absolute(), []
    while not path.exists() and path != path.parent:  # the store's folder may not exist yet
        path, missing = path.parent, [path.name, *missing]
    path = path.resolve().joinpath(*missing)  # symlinks resolved where they exist
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    best, best_type = None, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(_unescape_mount_field(fields[1]))
        if (path == point or point in path.parents) and (best is None or len(point.parts) >= len(best.parts)):
            best, best_type = point, fields[2]  # a later mount over the same point hides the earlier one
    return best_type


def sqlite_store_warning(tracking_uri: str, mounts: Path = Path("/proc/mounts")) -> str | None:
    """A warning when an SQLite MLflow store lies on a network filesystem, else None."""
    from biomedgpt.tracking.uris import sqlite_database

    try:
        database = sqlite_database(tracking_uri)
    except ValueError:  # a malformed URI is the tracker's to report
        return None
    if database is None:
        return None
    kind = filesystem_type(database.parent, mounts)
    if kind not in NETWORK_FILESYSTEMS:
        return None
    return (
        f"the MLflow store {tracking_uri} is an SQLite file on a {kind} (network) filesystem. SQLite's locking is "
        "unreliable there: with several jobs writing to it expect 'database is locked' errors or a corrupt store. "
        "Run an MLflow server (mlflow server --backend-store-uri postgresql://... or sqlite on a local disk) and "
        "set MLFLOW_TRACKING_URI=http://HOST:5000, or give each job its own database."
    )


def latest_step(checkpoint_dir: Path) -> int:
    from biomedgpt.checkpoint.layout import complete_tags, step_of_tag

    tags = complete_tags(checkpoint_dir)
    return (step_of_tag(tags[0]) or 0) if tags else 0


def tracking_uri_for(configured: str | None) -> str:
    from biomedgpt.tracking.mlflow_tracker import default_tracking_uri

    return configured or default_tracking_uri()


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The experiment, created as the trainer's tracker creates it (artifacts next to an SQLite database)."""
    from mlflow.exceptions import MlflowException

    from biomedgpt.tracking.mlflow_tracker import artifact_location

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name))
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
    parser.add_argument(
        "--check-inputs", action="store_true", help="check the data, tokenizer and model paths (exit 2 if unusable)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from biomedgpt.config_utils import ConfigError
    from biomedgpt.train.config import load_run_config

    try:
        config = load_run_config(args.config, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"job_prep: config error: {error}", file=sys.stderr)
        return 2
    if args.check_inputs:
        from biomedgpt.train.recipes import recipe_start_checks

        try:
            # In the batch shell: the job fails here, before srun starts any rank.
            warnings = recipe_start_checks(config.recipe)(config, hint=NOTHING_STARTED)
        except (ValueError, OSError) as error:
            print(f"job_prep: error: {error}", file=sys.stderr)
            return 2
        if args.config != "demo":
            for warning in warnings:
                print(f"job_prep: {warning}", file=sys.stderr)
    checkpoint_dir = Path(config.checkpoint.dir).resolve()
    lines = {
        "checkpoint_dir": str(checkpoint_dir),
        "max_steps": str(config.optim.max_steps),
        "latest_step": str(latest_step(checkpoint_dir)),
    }
    if args.mlflow and config.tracking.enabled:
        uri = tracking_uri_for(config.tracking.tracking_uri)
        lines["tracking_uri"] = uri
        warning = sqlite_store_warning(uri)
        if warning:
            print(f"job_prep: warning: {warning}", file=sys.stderr)
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
