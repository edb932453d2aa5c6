"""The layout of a training run's checkpoint directory: the one place the trainer (which writes it) and the
checkpoint tools (which read it) take its names from.

Layout of ``CKPT_DIR``::

    config.json               the model config (written once at start; what consolidation builds the model from)
    tokenizer/                the tokenizer the run trains with
    finetune_task.json        fine-tuning runs: the task's input settings and answers (biomedgpt/model_dir_files.py)
    metrics.jsonl             rank 0's record of every logged step and validation
    best/                     fine-tuning with validation: the best model directory so far
    step_00000050/            DeepSpeed's files for this tag (ZeRO shards, model states)
        rng_rank00000.pt      this rank's RNG states (dropout must replay exactly after a restart)
        ema_rank00000.pt      this rank's partition of the EMA weights (with ema.enabled)
        COMPLETE              written by rank 0 after every rank finished; holds step, time and file sizes
    latest                    name of the newest complete tag (written last, atomically)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "COMPLETE_MARKER",
    "CONFIG_FILES",
    "LATEST_FILE",
    "TAG_PATTERN",
    "TOKENIZER_DIR",
    "complete_tags",
    "files_intact",
    "rank_state_file",
    "step_of_tag",
    "tag_for_step",
]

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
#: Model config file names looked for beside the tags (the first is what the trainer writes).
CONFIG_FILES = ("config.json", "model_config.json")
TOKENIZER_DIR = "tokenizer"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def complete_tags(checkpoint_dir: str | Path) -> list[str]:
    """Tags with a completion marker, newest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
    tags = [t for t in tags if (root / t / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda t: step_of_tag(t) or 0, reverse=True)


def files_intact(directory: Path) -> str | None:
    """None when every file listed in the completion marker has its recorded size, else what is wrong."""
    try:
        files = json.loads((directory / COMPLETE_MARKER).read_text()).get("files", {})
    except (OSError, json.JSONDecodeError) as error:
        return f"unreadable {COMPLETE_MARKER} marker ({error})"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def rank_state_file(directory: str | Path, name: str, rank: int) -> Path:
    return Path(directory) / f"{name}_rank{rank:05d}.pt"
