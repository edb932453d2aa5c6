"""Wires the trainer to MLflow: params, artifacts and tags of a run, and one run per job across restarts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from biomedgpt.config_utils import config_to_dict
from biomedgpt.runtime.collectives import distributed
from biomedgpt.tracking import MLflowTracker, collect_run_params

logger = logging.getLogger(__name__)


def start_tracking(
    config: Any, ds_config: dict[str, Any], context: Any, run_id: str | None, tags: Mapping[str, str] | None = None
) -> tuple[MLflowTracker, str | None]:
    """Start (or, with ``run_id`` from a checkpoint, reopen) the run on rank 0; every rank gets its id. ``tags``
    (the recipe's) go beside ``recipe`` and ``run_name``."""
    section = config.tracking
    resolved = config_to_dict(config)
    tracker = MLflowTracker(
        tracking_uri=section.tracking_uri,
        experiment_name=section.experiment,
        run_name=section.run_name,
        run_id=run_id,
        tags={"recipe": config.recipe, **(tags or {}), "run_name": section.run_name or ""},
        enabled=context.is_main and section.enabled,
        system_metrics=section.system_metrics,
    )
    if tracker.enabled:
        params = collect_run_params(resolved, ds_config, context.world_size)
        started = tracker.start(params, artifacts={"resolved_config.yaml": resolved, "deepspeed.json": ds_config})
        run_id = started or run_id  # a tracker that cannot reach its store must not erase the saved id
        if started:
            logger.info("MLflow run %s in %s (experiment %r)", run_id, tracker.tracking_uri, section.experiment)
    if distributed():
        shared = [run_id]
        dist.broadcast_object_list(shared, src=0)
        run_id = shared[0]
    return tracker, run_id
