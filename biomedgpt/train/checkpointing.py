"""Checkpoints that survive preemption: every rank saves, ``latest`` moves only once all ranks are done, the last
K are kept, and a partial or corrupt checkpoint is skipped in favour of the previous one.

The directory layout (tags, ``latest``, completion markers) is :mod:`biomedgpt.checkpoint.layout`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from biomedgpt.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    complete_tags,
    files_intact,
    rank_state_file,
    tag_for_step,
)
from biomedgpt.runtime.collectives import all_ranks, distributed


class ResumeError(RuntimeError):
    """Checkpoints exist in the checkpoint directory but this run cannot continue from any of them."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if distributed():
        dist.barrier()


def save_checkpoint(
    engine: Any,
    checkpoint_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    keep_last: int,
    rank: int,
    rank_states: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the tag's directory. ``rank_states`` are this rank's own extra
    states (the EMA partitions), saved as ``<name>_rank<r>.pt`` and covered by the completion marker."""
    root = Path(checkpoint_dir)
    tag = tag_for_step(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), rank_state_file(root / tag, "rng", rank))
    for name, state in (rank_states or {}).items():
        torch.save(state, rank_state_file(root / tag, name, rank))
    _barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        # The sizes of every file let a later start reject a truncated checkpoint before any rank reads it.
        files = {p.name: p.stat().st_size for p in sorted((root / tag).iterdir()) if p.is_file()}
        marker = {"step": step, "time": time.time(), "files": files}
        (root / tag / COMPLETE_MARKER).write_text(json.dumps(marker))
        tmp = root / (LATEST_FILE + ".tmp")
        tmp.write_text(tag)
        tmp.replace(root / LATEST_FILE)
        for old in complete_tags(root)[keep_last:]:
            shutil.rmtree(root / old, ignore_errors=True)
    _barrier()
    return root / tag


def _load_state_file(path: Path) -> Any:
    return torch.load(path, weights_only=False, map_location="cpu")


def load_rank_state(directory: str | Path, name: str, rank: int) -> Any | None:
    """Rank ``rank``'s own ``<name>_rank<r>.pt`` of a checkpoint; None when it has none."""
    path = rank_state_file(directory, name, rank)
    return _load_state_file(path) if path.is_file() else None


def load_rank_states(directory: str | Path, name: str) -> list[Any]:
    """Every rank's ``<name>_rank<r>.pt`` of a checkpoint, in rank order (the saving run may have had another
    world size); an error naming the checkpoint when there are none."""
    files = sorted(Path(directory).glob(f"{name}_rank*.pt"))
    if not files:
        raise FileNotFoundError(
            f"{directory} has no {name}_rank*.pt files: it was saved by a run without {name}; start from a checkpoint "
            f"that has them, or turn {name} off"
        )
    return [_load_state_file(path) for path in files]


def load_latest_checkpoint(engine: Any, checkpoint_dir: str | Path, rank: int) -> dict[str, Any] | None:
    """Collective: load the newest complete checkpoint every rank can read; None when there is none.

    The returned client state carries this rank's RNG states under ``rng_state`` (see :func:`set_rng_state`).

    A checkpoint that fails to load on any rank (truncated file, missing shard) is skipped with a warning and the
    previous one is tried, so a crash during a save costs one interval, not the run. When checkpoints exist but
    none loads, or they were saved by another number of ranks (ZeRO shards resume on the same count), it raises
    :class:`ResumeError` rather than start over and let the new run's saves prune the old ones.
    """
    tags = complete_tags(checkpoint_dir)
    world_size = dist.get_world_size() if distributed() else 1
    if tags:
        saved_ranks = len(list((Path(checkpoint_dir) / tags[0]).glob("*optim_states.pt")))
        if saved_ranks and saved_ranks != world_size:
            raise ResumeError(
                f"{Path(checkpoint_dir) / tags[0]} was saved by {saved_ranks} ranks and this run has {world_size}; "
                f"ZeRO checkpoints resume on the same number of ranks. Resume with {saved_ranks} ranks, or "
                f"consolidate it (biomedgpt-consolidate {checkpoint_dir} OUT) and start a new run with "
                "model.init_from=OUT and another checkpoint.dir"
            )
    for tag in tags:
        directory = Path(checkpoint_dir) / tag
        error: Exception | str | None = None
        client_state: dict[str, Any] | None = None
        # Agree on the files first: a rank failing inside DeepSpeed's collective load would hang the others.
        damage = files_intact(directory)
        if not all_ranks(damage is None):
            if rank == 0:
                warnings.warn(
                    f"checkpoint {directory} could not be loaded ({damage or 'damaged on another rank'}); "
                    "trying the previous one",
                    stacklevel=2,
                )
            continue
        try:
            load_path, client_state = engine.load_checkpoint(
                str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            ok = load_path is not None and client_state is not None
            rng = load_rank_state(directory, "rng", rank) if ok else None
            if rng is not None:
                # Applied by the caller just before the next step: building the data iterator draws from the RNG.
                client_state["rng_state"] = rng
            if ok:
                client_state["checkpoint_path"] = str(directory)
        except Exception as exc:  # a corrupt checkpoint shows up as any of torch.load's errors
            ok, error = False, exc
        if all_ranks(ok):
            return client_state
        if rank == 0:
            warnings.warn(
                f"checkpoint {directory} could not be loaded ({error or 'incomplete on some rank'}); "
                "trying the previous one",
                stacklevel=2,
            )
    if tags:
        raise ResumeError(
            f"none of the {len(tags)} complete checkpoints in {checkpoint_dir} could be loaded (see the warnings "
            "above); fix or move them, or start over with checkpoint.resume=false or another checkpoint.dir"
        )
    return None
