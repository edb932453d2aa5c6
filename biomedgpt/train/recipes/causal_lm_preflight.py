"""The ``causal_lm`` recipe's checks before any process group starts (``biomedgpt-train``, its ``--dry-run`` and
``slurm/job_prep.py`` in the batch shell): the token shards exist and fit the model's vocabulary, the model directory
holds a config. Light: transformers is imported only to read the model's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedgpt.data.documents import token_shards_meta
from biomedgpt.train.recipes.base import report_problems
from biomedgpt.train.recipes.causal_lm_config import CausalLMTrainConfig

__all__ = ["check_inputs", "model_config", "start_checks"]


def model_config(config: CausalLMTrainConfig) -> Any:
    """The transformers config of the run's model (read from ``model.path`` or built from ``model.config``)."""
    from transformers import AutoConfig

    section = config.model
    if section.path is not None:
        return AutoConfig.from_pretrained(section.path)
    settings = dict(section.config or {})
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def check_inputs(config: CausalLMTrainConfig) -> list[str]:
    """Every problem with the run's inputs: the token shards (training and validation) exist, the model directory
    holds a config, and the training rows were tokenized for the model's vocabulary."""
    problems = []
    try:
        meta = token_shards_meta(str(config.data.train))
    except ValueError as error:
        meta = None
        problems.append(f"data.train={config.data.train}: {error}")
    if config.validation.data:
        try:
            token_shards_meta(str(config.validation.data))
        except ValueError as error:
            problems.append(f"validation.data={config.validation.data}: {error}")
    if config.model.path is not None and not (Path(config.model.path) / "config.json").is_file():
        problems.append(f"model.path={config.model.path}: no config.json there (a Hugging Face model directory)")
    elif meta is not None:
        vocab = int(getattr(model_config(config), "vocab_size", 0))
        if int(meta.get("vocab_size", 0)) > vocab:
            problems.append(
                f"data.train={config.data.train} was tokenized with {meta.get('tokenizer')} ({meta.get('vocab_size')} "
                f"ids) but the model has vocab_size={vocab}; convert with the model's tokenizer"
            )
    return problems


def start_checks(config: CausalLMTrainConfig, *, allow_missing: bool = False, hint: str = "") -> list[str]:
    """The recipe's start check (see :data:`biomedgpt.train.recipes.RECIPES`)."""
    return report_problems(check_inputs(config), allow_missing, hint)
