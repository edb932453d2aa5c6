"""The run config of the ``causal_lm`` recipe: continued pretraining of a Hugging Face causal LM (Llama 2/3,
Mistral, Qwen2, GPT-2 families) on token shards of ``biomedgpt-convert --kind documents``.

Light on purpose (no torch, no transformers): loading a config, ``--help`` and the start checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from biomedgpt.train.config import BatchSection, CheckpointSection, EmaSection, OptimSection, TrackingSection


@dataclass
class CausalLMModelSection:
    # A Hugging Face model directory to continue from (loaded partitioned under ZeRO-3), or an inline config
    # (``model_type`` and sizes, as a config.json holds them) for a model built from scratch: exactly one of the two.
    path: str | None = None
    config: dict[str, Any] | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (less memory)
    # Target tokens whose logits exist at once in the loss (the vocabulary is 32k-128k: no [B, T, V] fp32 logits).
    loss_chunk_size: int = 1024

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path (a Hugging Face model directory) and model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs model_type (e.g. llama, mistral, qwen2, gpt2) besides the sizes")
        if self.loss_chunk_size < 1:
            raise ValueError(f"model.loss_chunk_size={self.loss_chunk_size} must be >= 1")


@dataclass
class TokenDataSection:
    train: str | None = None  # a directory of biomedgpt-convert --kind documents
    tokenizer: str | None = None  # a Hugging Face tokenizer directory; None: model.path's
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int | None = 1
    num_workers: int = 0
    seed: int = 0
    # Shards converted with --keep-document-ids: attention stays inside each document (positions restart there).
    mask_documents: bool = True

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train must name token shards (biomedgpt-convert --kind documents --out DIR)")


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
class CausalLMTrainConfig:
    """The run config of the ``causal_lm`` recipe."""

    recipe: Literal["causal_lm"] = "causal_lm"
    model: CausalLMModelSection = field(default_factory=lambda: CausalLMModelSection(config={"model_type": "llama"}))
    data: TokenDataSection = field(default_factory=lambda: TokenDataSection(train="data/tokens"))
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: PerplexityValidationSection = field(default_factory=PerplexityValidationSection)
    ema: EmaSection = field(default_factory=EmaSection)
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="causal-lm"))
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed_config: str = "zero3_cpu.json"
    log_every_steps: int = 1
    peak_tflops: float | None = None
    seed: int = 0
    dist_timeout_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.model.path is None and self.data.tokenizer is None:
            raise ValueError(
                "a model built from model.config needs data.tokenizer (a Hugging Face tokenizer directory)"
            )
        unsupported = {
            "optim.drop_worst_ratio": self.optim.drop_worst_ratio != 0.0,
            "optim.fused_loss": self.optim.fused_loss,  # the loss is always chunked here (model.loss_chunk_size)
        }
        named = [key for key, used in unsupported.items() if used]
        if named:
            raise ValueError(f"{', '.join(named)}: BiomedGPT settings the causal_lm recipe does not take")
        if self.log_every_steps < 1:
            raise ValueError("log_every_steps must be >= 1")
