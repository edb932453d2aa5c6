"""Experiment tracking (MLflow) for the trainer: rank 0 only, asynchronous, with resume and terminal statuses.

Typical use in the trainer::

    params = collect_run_params(resolved_config, ds_config, world_size)
    tracker = MLflowTracker(experiment_name=..., run_name=..., run_id=ckpt_run_id, tags={...}, enabled=rank == 0)
    with tracker:
        run_id = tracker.start(params, artifacts={"resolved.yaml": resolved_config, "deepspeed.json": ds_config})
        for step ...:
            tracker.log_metrics({"loss": ..., "lr": ...}, step)
"""

from biomedgpt.tracking.mlflow_tracker import (
    DEFAULT_DB_NAME,
    MLflowTracker,
    RunStatus,
    TrackingWarning,
    default_tracking_uri,
    process_rank,
)
from biomedgpt.tracking.params import collect_run_params, flatten_params, git_info, package_versions

ExperimentTracker = MLflowTracker

__all__ = [
    "DEFAULT_DB_NAME",
    "ExperimentTracker",
    "MLflowTracker",
    "RunStatus",
    "TrackingWarning",
    "collect_run_params",
    "default_tracking_uri",
    "flatten_params",
    "git_info",
    "package_versions",
    "process_rank",
]
