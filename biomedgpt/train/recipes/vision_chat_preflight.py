"""The ``vision_chat`` recipe's checks before any process group starts (``biomedgpt-train``, its ``--dry-run`` and
``slurm/job_prep.py`` in the batch shell): the conversation shards and the model directories exist. Light."""

from __future__ import annotations

from pathlib import Path

from biomedgpt.data.parquet_shards import read_index
from biomedgpt.train.recipes.base import report_problems
from biomedgpt.train.recipes.vision_chat_config import VisionChatTrainConfig

__all__ = ["check_inputs", "start_checks"]


def check_inputs(config: VisionChatTrainConfig) -> list[str]:
    problems = []
    try:
        kind = read_index(str(config.data.train)).get("biomedgpt", {}).get("kind")
    except (OSError, ValueError) as error:
        kind = None
        problems.append(
            f"data.train={config.data.train}: no index.json of biomedgpt-convert there ({error}); convert LLaVA "
            f"conversation JSON with biomedgpt-convert FILE --kind conversations --out {config.data.train}"
        )
    else:
        if kind != "conversations":
            problems.append(f"data.train={config.data.train}: converted as {kind!r}, not --kind conversations")
    for key in ("init_from", "vision", "language"):
        path = getattr(config.model, key)
        if path is not None and not (Path(path) / "config.json").is_file():
            problems.append(f"model.{key}={path}: no config.json there (a Hugging Face model directory)")
    if config.data.tokenizer is not None and not Path(config.data.tokenizer).is_dir():
        problems.append(f"data.tokenizer={config.data.tokenizer}: no such directory")
    return problems


def start_checks(config: VisionChatTrainConfig, *, allow_missing: bool = False, hint: str = "") -> list[str]:
    """The recipe's start check (see :data:`biomedgpt.train.recipes.RECIPES`)."""
    return report_problems(check_inputs(config), allow_missing, hint)
