"""The run config of the ``causal_lm`` recipe: continued pretraining of a Hugging Face causal LM (Llama 2/3,
Mistral, Qwen2, GPT-2 families) on token shards of ``biomedgpt-convert --kind documents``.

Light on purpose (no torch, no transformers): loading a config, ``--help`` and the start checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from biomedgpt.train.config import TrackingSection
from biomedgpt.train.recipes.run_settings import RunSettings


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
class CausalLMTrainConfig(RunSettings):
    """The run config of the ``causal_lm`` recipe."""

    recipe: Literal["causal_lm"] = "causal_lm"
    model: CausalLMModelSection = field(default_factory=lambda: CausalLMModelSection(config={"model_type": "llama"}))
    data: TokenDataSection = field(default_factory=lambda: TokenDataSection(train="data/tokens"))
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="causal-lm"))

    def __post_init__(self) -> None:
        if self.model.path is None and self.data.tokenizer is None:
            raise ValueError(
                "a model built from model.config needs data.tokenizer (a Hugging Face tokenizer directory)"
            )
        self.check_run_settings(self.recipe)
