"""A vision-language chat model (LLaVA / LLaVA-Med / Vision-BioLLM): a vision tower, a projector and a causal LM,
built as transformers' ``LlavaForConditionalGeneration`` so that a trained model is a directory transformers loads.

- Vision tower: a ``CLIPVisionModel`` or ``SiglipVisionModel`` (LanguageBind's image tower has the CLIP layout),
  from a Hugging Face directory or a config; its features come from ``feature_layer`` (LLaVA: the second-to-last,
  -2) and, with ``select="patch"``, without the CLS token (LLaVA's ``default``; SigLIP has none: use ``full``).
- Projector: ``mlp2x_gelu`` (LLaVA-1.5: linear, GELU, linear: transformers' ``LlavaMultiModalProjector``), or
  ``linear`` / ``mlp{N}x_gelu`` (LLaVA's other ``mm_projector_type`` values, :class:`MultiModalProjector`; a model
  with one of those loads through this module, not plain transformers).
- Language model: any causal LM transformers builds (Llama 2/3, Mistral, Qwen2), from a directory or a config.

The image placeholder is one token of the LM's tokenizer (``image_token_id``); the chat data repeats it once per
image feature (:func:`image_feature_count`), and the model puts the projected features at those positions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PROJECTOR_PATTERN",
    "MultiModalProjector",
    "build_vision_chat_model",
    "image_feature_count",
    "load_parts",
    "load_vision_chat_model",
    "add_lora",
    "lora_targets",
    "LORA_PARAMETER_PATTERNS",
    "projector_layers",
    "vision_chat_config",
]

PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
SELECT_STRATEGIES = {"patch": "default", "full": "full"}  # ours -> transformers' vision_feature_select_strategy


def projector_layers(kind: str) -> int:
    """Linear layers of projector ``kind`` (``linear``: 1, ``mlpNx_gelu``: N); a ValueError for anything else."""
    match = PROJECTOR_PATTERN.match(kind)
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(f"projector {kind!r}: choose linear or mlpNx_gelu (N >= 1, e.g. mlp2x_gelu as LLaVA-1.5)")
    return 1 if match.group(1) == "linear" else int(match.group(2))


class MultiModalProjector(nn.Module):
    """LLaVA's ``linear`` and ``mlpNx_gelu`` projectors (vision width -> LM width; GELU between the linear layers).
    With two layers it has the parameter names of transformers' ``LlavaMultiModalProjector``."""

    def __init__(self, vision_width: int, text_width: int, layers: int) -> None:
        super().__init__()
        self.layers = layers
        widths = [vision_width] + [text_width] * layers
        for index in range(layers):
            setattr(self, f"linear_{index + 1}", nn.Linear(widths[index], widths[index + 1]))
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for index in range(self.layers):
            if index:
                features = self.act(features)
            features = getattr(self, f"linear_{index + 1}")(features)
        return features


def _config(source: str | dict[str, Any], what: str) -> Any:
    from transformers import AutoConfig

    if isinstance(source, str):
        config = AutoConfig.from_pretrained(source)
        return getattr(config, "vision_config", config) if what == "vision" else config
    settings = dict(source)
    if "model_type" not in settings:
        raise ValueError(f"the inline {what} config needs model_type (e.g. clip_vision_model, llama)")
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def vision_chat_config(
    vision: str | dict[str, Any],
    language: str | dict[str, Any],
    image_token_id: int,
    feature_layer: int = -2,
    select: str = "patch",
) -> Any:
    """The ``LlavaConfig`` of a vision tower and a causal LM (each a Hugging Face directory or an inline config)."""
    from transformers import LlavaConfig

    if select not in SELECT_STRATEGIES:
        raise ValueError(f"select={select!r}: choose patch (drop the CLS token, as LLaVA) or full")
    vision_config = _config(vision, "vision")
    if vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            f"vision tower model_type {vision_config.model_type!r}: a CLIP or SigLIP vision model (clip_vision_model, "
            "siglip_vision_model; LanguageBind's image tower is CLIP)"
        )
    if vision_config.model_type == "siglip_vision_model" and select == "patch":
        raise ValueError("a SigLIP tower has no CLS token to drop: use select=full (every patch feature)")
    text_config = _config(language, "language")
    layers = vision_config.num_hidden_layers
    if not -layers <= feature_layer < layers:
        raise ValueError(f"feature_layer={feature_layer}: the vision tower has {layers} layers")
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=SELECT_STRATEGIES[select],
        image_seq_length=image_feature_count_of(vision_config, select),
    )
    return config


def image_feature_count_of(vision_config: Any, select: str) -> int:
    patches = (int(vision_config.image_size) // int(vision_config.patch_size)) ** 2
    has_cls = vision_config.model_type == "clip_vision_model"
    return patches + (1 if has_cls and select == "full" else 0)


def image_feature_count(config: Any) -> int:
    """Positions one image takes in the LM's input (one per selected vision feature)."""
    select = "full" if config.vision_feature_select_strategy == "full" else "patch"
    return image_feature_count_of(config.vision_config, select)


def build_vision_chat_model(config: Any, projector: str = "mlp2x_gelu") -> nn.Module:
    """``LlavaForConditionalGeneration`` of ``config`` (freshly initialised; see :func:`load_parts`) with the projector
    of kind ``projector``."""
    from transformers import LlavaForConditionalGeneration

    layers = projector_layers(projector)
    model = LlavaForConditionalGeneration(config)
    if layers != 2:
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        model.model.multi_modal_projector = MultiModalProjector(vision_width, text_width, layers)
    model.config.projector_type = projector  # kept in config.json: the layout of the projector's weights
    return model


def load_parts(model: nn.Module, vision: str | None, language: str | None) -> list[str]:
    """Copy the weights of the vision tower directory ``vision`` and the causal LM directory ``language`` into
    ``model`` (each part as its own ``from_pretrained`` loads it); returns the keys left at their initial values."""
    from transformers import AutoModel, AutoModelForCausalLM

    untouched = {name for name, _ in model.named_parameters()}
    if vision is not None:
        state = _vision_state(AutoModel.from_pretrained(vision).state_dict(), model)
        if not state:
            raise ValueError(f"{vision}: no weights of a CLIP or SigLIP vision tower there")
        model.model.vision_tower.load_state_dict(state, strict=False)
        untouched -= {f"model.vision_tower.{k}" for k in state}
    if language is not None:
        lm = AutoModelForCausalLM.from_pretrained(language)
        model.model.language_model.load_state_dict(lm.base_model.state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        untouched -= {f"model.language_model.{k}" for k in lm.base_model.state_dict()}
        untouched -= {f"lm_head.{k}" for k in lm.get_output_embeddings().state_dict()}
    return sorted(untouched)


def _vision_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP/SigLIP checkpoint's keys as the tower module names them (a full CLIPModel's vision half, too)."""
    own = set(model.model.vision_tower.state_dict())
    out = {}
    for key, value in state.items():
        for candidate in (key, key.removeprefix("vision_model."), f"vision_model.{key}"):
            if candidate in own:
                out[candidate] = value
                break
    return out


def load_vision_chat_model(directory: str | Path, **kwargs: Any) -> tuple[nn.Module, dict[str, list[str]]]:
    """A written model directory (``config.json`` of model_type llava and safetensors), with the projector its config
    names, and transformers' loading info (missing / unexpected keys)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(directory)
    projector = getattr(config, "projector_type", "mlp2x_gelu")
    lora = getattr(config, "lora", None)
    if projector_layers(projector) == 2 and not lora:  # transformers' own layout
        return LlavaForConditionalGeneration.from_pretrained(directory, output_loading_info=True, **kwargs)
    from safetensors.torch import load_file

    model = build_vision_chat_model(config, projector)
    if lora:  # the adapters as trained, unmerged (biomedgpt-merge-lora folds them in)
        add_lora(model, lora["r"], lora["alpha"], lora["dropout"], exclude=(), targets=lora["targets"])
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("model*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    return model, {"missing_keys": [k for k in missing if k not in tied], "unexpected_keys": list(unexpected)}


LORA_PARAMETER_PATTERNS = ("*.lora_A.*", "*.lora_B.*")


def lora_targets(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every linear layer of the language model (LLaVA's ``find_all_linear_names``: the attention and MLP
    projections), by full module name; the output head and the projector are never adapted, nor names matching one
    of the fnmatch patterns ``exclude``."""
    import fnmatch

    prefix = "model.language_model."
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix)
        and isinstance(module, nn.Linear)
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    ]


def add_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    exclude: tuple[str, ...] = (),
    targets: list[str] | None = None,
) -> list[str]:
    """LoRA adapters (PEFT, injected in place: parameter names stay the model's, plus ``.lora_A``/``.lora_B`` and
    ``.base_layer``) on the language model's linear layers; returns the adapted module names. The settings are kept in
    ``model.config.lora`` so that a consolidated directory can be loaded and merged."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets) if targets is not None else lora_targets(model, exclude)
    if not targets:
        raise ValueError("LoRA: no linear layer of the language model is left to adapt (model.lora.exclude)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model)
    model.config.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
    return targets
