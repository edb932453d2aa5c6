"""The run config of the ``vision_chat`` recipe: a vision-language chat model (LLaVA / LLaVA-Med / Vision-BioLLM:
a CLIP or SigLIP vision tower, a projector and a causal LM) trained on conversation shards of ``biomedgpt-convert
--kind conversations``, stage by stage (``vlm_align``: the projector alone).

Light on purpose (no torch, no transformers): loading a config, ``--help`` and the start checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from biomedgpt.data.chat_templates import CHAT_TEMPLATES
from biomedgpt.train.config import TrackingSection
from biomedgpt.train.recipes.run_settings import RunSettings

PROJECTOR_PREFIX = "model.multi_modal_projector."
VISION_TOWER_PREFIX = "model.vision_tower."


@dataclass
class LoraSection:
    """LoRA adapters on the language model's linear layers (LLaVA-1.5 stage 2: r 128, alpha 256, dropout 0.05)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    exclude: list[str] = field(default_factory=list)  # module-name patterns not to adapt (the head never is)
    # Only these layers (full or last module name patterns: [q_proj, v_proj]); None: every linear layer of the LM.
    targets: list[str] | None = None
    # "4bit": QLoRA, the language model's frozen linear weights stored as 4-bit NormalFloat (bitsandbytes, CUDA
    # GPUs only, from model.init_from, ZeRO-2 or less), the adapters trained in bf16 on top.
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"model.lora.r={self.r} and model.lora.alpha={self.alpha} must be >= 1")
        if self.quantize not in (None, "4bit"):
            raise ValueError(f"model.lora.quantize={self.quantize!r}: 4bit (QLoRA) or null")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout} must lie in [0, 1)")
        if self.targets is not None and not self.targets:
            raise ValueError("model.lora.targets is empty: give layer names (q_proj, v_proj, ...) or null for all")


@dataclass
class VisionChatModelSection:
    # A previous stage's model (a biomedgpt-consolidate directory of a vision_chat run: model_type llava), or the
    # parts: each from a Hugging Face directory or an inline config (model_type and sizes), exactly one of the two.
    init_from: str | None = None
    vision: str | None = None  # CLIPVisionModel / SiglipVisionModel (or a full CLIP model: its vision half)
    vision_config: dict[str, Any] | None = None
    language: str | None = None  # a causal LM (Llama, Mistral, Qwen2, ...)
    language_config: dict[str, Any] | None = None
    projector: str = "mlp2x_gelu"  # linear | mlpNx_gelu
    feature_layer: int = -2  # vision features from this hidden layer (LLaVA: the second-to-last)
    select: Literal["patch", "full"] = "patch"  # patch: drop the CLS token (LLaVA); full: keep it (SigLIP has none)
    # Parameter names (fnmatch patterns) that train; everything else is frozen. The vision tower always is.
    trainable: list[str] = field(default_factory=lambda: [PROJECTOR_PREFIX + "*"])
    projector_lr: float | None = None  # None: optim.lr
    # LoRA on the language model (its adapters train beside model.trainable), or None for none.
    lora: LoraSection | None = None
    # When model.init_from holds LoRA adapters (a stage-2 result): merge them into the weights first, or keep them,
    # frozen and active, under a new model.lora adapter that trains on top ("stack").
    previous_lora: Literal["merge", "stack"] = "merge"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 1024

    def __post_init__(self) -> None:
        parts = ("vision", "vision_config", "language", "language_config")
        if self.init_from is not None:
            given = [f"model.{key}" for key in parts if getattr(self, key) is not None]
            if given:
                raise ValueError(f"model.init_from holds the whole model: drop {', '.join(given)}")
        else:
            for part in ("vision", "language"):
                if (getattr(self, part) is None) == (getattr(self, f"{part}_config") is None):
                    raise ValueError(
                        f"give exactly one of model.{part} (a Hugging Face directory) and model.{part}_config, or "
                        "model.init_from (a previous stage's model)"
                    )
        if not self.trainable:
            raise ValueError("model.trainable is empty: nothing would train")
        tower = [p for p in self.trainable if p.startswith(VISION_TOWER_PREFIX[:-1]) or p in ("*", "model.*")]
        if tower:
            raise ValueError(
                f"model.trainable={tower}: the vision tower stays frozen (name the projector and language model "
                f"parts, e.g. {PROJECTOR_PREFIX}* and model.language_model.*)"
            )
        if self.loss_chunk_size < 1:
            raise ValueError(f"model.loss_chunk_size={self.loss_chunk_size} must be >= 1")


@dataclass
class ChatDataSection:
    train: str | None = None  # a directory of biomedgpt-convert --kind conversations
    tokenizer: str | None = None  # a Hugging Face tokenizer directory; None: model.language's
    template: str = "plain"
    system: str | None = None  # the system prompt of templates that have one
    max_length: int = 2048  # tokens per example, image positions included; the rest is cut
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int | None = 1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train must name conversation shards (biomedgpt-convert --kind conversations)")
        if self.template not in CHAT_TEMPLATES:
            raise ValueError(f"data.template={self.template!r}: choose one of {', '.join(CHAT_TEMPLATES)}")
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length} must be >= 2")


@dataclass
class VisionChatTrainConfig(RunSettings):
    """The run config of the ``vision_chat`` recipe."""

    recipe: Literal["vision_chat"] = "vision_chat"
    model: VisionChatModelSection = field(
        default_factory=lambda: VisionChatModelSection(
            vision_config={"model_type": "clip_vision_model"}, language_config={"model_type": "llama"}
        )  # fmt: skip
    )
    data: ChatDataSection = field(default_factory=lambda: ChatDataSection(train="data/conversations"))
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="vision-chat"))
    deepspeed_config: str = "zero2_cpu.json"

    def __post_init__(self) -> None:
        if self.model.language is None and self.model.init_from is None and self.data.tokenizer is None:
            raise ValueError(
                "a language model built from model.language_config needs data.tokenizer (a Hugging Face tokenizer)"
            )
        self.check_run_settings(self.recipe)
