"""The run-level sections the training core reads (see ``biomedgpt/train/recipes/base.py``), shared by the run
configs of the recipes on Hugging Face models (``causal_lm``, ``vision_chat``); each adds ``recipe``, ``model`` and
``data``. BiomedGPT's ``TrainConfig`` keeps its own (its field order is in every dumped config of past runs).

Light on purpose (no torch, no transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from biomedgpt.train.config import BatchSection, CheckpointSection, EmaSection, OptimSection, TrackingSection

__all__ = ["PerplexityValidationSection", "RunSettings"]


@dataclass
class PerplexityValidationSection:
    """Perplexity on held-out token rows (``biomedgpt-convert --kind documents`` of a held-out split)."""

    data: str | None = None  # None: no validation
    every_steps: int = 500  # and after the last step
    limit: int | None = None  # validate on the first N rows only
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.batch_size < 1:
            raise ValueError("validation.every_steps and validation.batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"validation.limit={self.limit} must be >= 1 (or null for every row)")


@dataclass
class RunSettings:
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: PerplexityValidationSection = field(default_factory=PerplexityValidationSection)
    ema: EmaSection = field(default_factory=EmaSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed_config: str = "zero3_cpu.json"
    log_every_steps: int = 1
    peak_tflops: float | None = None
    seed: int = 0
    dist_timeout_minutes: float | None = None

    def check_run_settings(self, recipe: str, unsupported: dict[str, bool] | None = None) -> None:
        """Refuse BiomedGPT-only settings (and the recipe's own ``unsupported`` keys that are set)."""
        refused = {
            "optim.drop_worst_ratio": self.optim.drop_worst_ratio != 0.0,
            "optim.fused_loss": self.optim.fused_loss,  # the loss is always chunked here (model.loss_chunk_size)
            **(unsupported or {}),
        }
        named = [key for key, used in refused.items() if used]
        if named:
            raise ValueError(f"{', '.join(named)}: settings the {recipe} recipe does not take")
        if self.log_every_steps < 1:
            raise ValueError("log_every_steps must be >= 1")
