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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PROJECTOR_PATTERN",
    "MultiModalProjector",
    "build_vision_chat_model",
    "image_feature_count",
    "assemble_vision_chat_model",
    "load_vision_chat_model",
    "add_lora",
    "lora_adapters",
    "lora_parameter_patterns",
    "lora_targets",
    "merge_lora_layers",
    "restore_lora",
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
    """``LlavaForConditionalGeneration`` of ``config``, freshly initialised, with the projector of kind ``projector``
    (:func:`assemble_vision_chat_model` loads parts from directories)."""
    from transformers import LlavaForConditionalGeneration

    layers = projector_layers(projector)
    model = LlavaForConditionalGeneration(config)
    if layers != 2:
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        model.model.multi_modal_projector = MultiModalProjector(vision_width, text_width, layers)
    model.config.projector_type = projector  # kept in config.json: the layout of the projector's weights
    return model


def assemble_vision_chat_model(
    config: Any, projector: str, vision: str | None, language: str | None, zero3_config: dict[str, Any] | None = None
) -> nn.Module:
    """``LlavaForConditionalGeneration`` of ``config`` whose vision tower is loaded from the directory ``vision`` and
    whose language model and head from the causal LM directory ``language`` (each part through its own
    ``from_pretrained``, which reads any layout transformers reads: a full CLIP model gives its vision half, sharded
    safetensors, tied heads); a part without a directory is built from its config. With ``zero3_config`` (a ZeRO-3
    DeepSpeed config) every part is built or loaded partitioned, so no rank ever holds the whole model: transformers
    does that while a ``HfDeepSpeedConfig`` is alive, and the projector is built inside ``deepspeed.zero.Init``.

    A directory whose weights do not fill its part (it would train partly random) is an error naming the keys."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        CLIPVisionModel,
        LlavaForConditionalGeneration,
        SiglipVisionModel,
    )
    from transformers.integrations import HfDeepSpeedConfig

    layers = projector_layers(projector)
    with torch.device("meta"):  # the frame only: every part below replaces its meta counterpart
        model = LlavaForConditionalGeneration(config)
    keep = HfDeepSpeedConfig(zero3_config) if zero3_config is not None else None  # noqa: F841 (alive while building)

    def loaded(model_class: Any, directory: str, what: str) -> nn.Module:
        part, info = model_class.from_pretrained(directory, output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(
                f"{what}={directory}: {len(info['missing_keys'])} weights are not in the directory and would stay "
                f"random ({', '.join(info['missing_keys'][:4])}); is it the model its key says?"
            )
        return part

    towers = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
    if vision is not None:
        tower = loaded(towers[config.vision_config.model_type], vision, "model.vision")
    else:
        tower = AutoModel.from_config(config.vision_config)
    if language is not None:
        lm = loaded(AutoModelForCausalLM, language, "model.language")
    else:
        lm = AutoModelForCausalLM.from_config(config.text_config)
    vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    if zero3_config is not None:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=zero3_config):
            head = MultiModalProjector(vision_width, text_width, layers)
    else:
        head = MultiModalProjector(vision_width, text_width, layers)
    model.model.vision_tower = tower
    model.model.multi_modal_projector = head
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    model.config.projector_type = projector
    return model


def load_vision_chat_model(directory: str | Path, **kwargs: Any) -> tuple[nn.Module, dict[str, list[str]]]:
    """A written model directory (``config.json`` of model_type llava and safetensors), with the projector its config
    names, and transformers' loading info (missing / unexpected keys)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(directory)
    projector = getattr(config, "projector_type", "mlp2x_gelu")
    lora = lora_adapters(config)
    if projector_layers(projector) == 2 and not lora:  # transformers' own layout
        return LlavaForConditionalGeneration.from_pretrained(directory, output_loading_info=True, **kwargs)
    from safetensors.torch import load_file

    model = build_vision_chat_model(config, projector)
    if lora:  # the adapters as trained, unmerged (biomedgpt-merge-lora folds them in)
        restore_lora(model, lora)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("model*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    return model, {"missing_keys": [k for k in missing if k not in tied], "unexpected_keys": list(unexpected)}


def lora_parameter_patterns(adapter: str) -> list[str]:
    """fnmatch patterns of adapter ``adapter``'s parameters (PEFT names them ``….lora_A.<adapter>.weight``)."""
    return [f"*.lora_A.{adapter}.*", f"*.lora_B.{adapter}.*"]


def lora_adapters(config: Any) -> list[dict[str, Any]]:
    """The LoRA adapters a model config records (``config.lora``), in the order they were added; [] for none."""
    recorded = getattr(config, "lora", None) or []
    return [dict(recorded, name="default")] if isinstance(recorded, dict) else [dict(a) for a in recorded]


def lora_targets(model: nn.Module, exclude: tuple[str, ...] = (), include: list[str] | None = None) -> list[str]:
    """Every linear layer of the language model (LLaVA's ``find_all_linear_names``: the attention and MLP
    projections), by full module name; the output head and the projector are never adapted, nor names matching one
    of the fnmatch patterns ``exclude``. ``include`` keeps only the layers whose full or last name matches one of its
    patterns (``q_proj``, ``*.self_attn.*``); a pattern that matches no layer is an error. A layer already adapted
    counts once (not its ``base_layer``)."""
    import fnmatch

    from peft.tuners.lora import LoraLayer

    prefix = "model.language_model."
    names = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        inside_adapter = ".lora_" in name or name.endswith(".base_layer")
        if isinstance(module, LoraLayer) or (isinstance(module, nn.Linear) and not inside_adapter):
            names.append(name)
    if include is None:
        return names

    def matches(name: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)

    unmatched = [pattern for pattern in include if not any(matches(name, pattern) for name in names)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ValueError(
            f"LoRA targets {', '.join(unmatched)} match no linear layer of the language model (its layers: "
            f"{', '.join(leaves)})"
        )
    return [name for name in names if any(matches(name, pattern) for pattern in include)]


def add_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    exclude: tuple[str, ...] = (),
    targets: list[str] | None = None,
    name: str | None = None,
) -> str:
    """A LoRA adapter (PEFT, injected in place: parameter names stay the model's, plus ``.lora_A.<name>``/
    ``.lora_B.<name>`` and ``.base_layer``) on the language model's linear layers; returns its name (``default`` for
    the first, ``adapter_2``, ... for one on top of earlier ones, which stay active: their sum is the model). The
    settings are appended to ``model.config.lora`` so that a consolidated directory can be loaded and merged."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    adapters = lora_adapters(model.config)
    name = name or ("default" if not adapters else f"adapter_{len(adapters) + 1}")
    targets = list(targets) if targets is not None else lora_targets(model, exclude)
    if not targets:
        raise ValueError("LoRA: no linear layer of the language model is left to adapt (model.lora.exclude)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with warnings.catch_warnings():  # PEFT warns that a second adapter makes several: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    for module in model.modules():
        if isinstance(module, LoraLayer):  # every adapter a layer holds is active (a new one on top of the others)
            module.set_adapter(list(module.lora_A.keys()))
    adapters.append({"name": name, "r": r, "alpha": alpha, "dropout": dropout, "targets": targets})
    model.config.lora = adapters
    return name


def restore_lora(model: nn.Module, adapters: list[dict[str, Any]]) -> None:
    """The adapters a config records (:func:`lora_adapters`), injected again, in order, to load trained weights."""
    model.config.lora = []
    for adapter in adapters:
        add_lora(model, adapter["r"], adapter["alpha"], adapter["dropout"], targets=adapter["targets"],
                 name=adapter["name"])  # fmt: skip


def merge_lora_layers(model: nn.Module) -> int:
    """Fold every adapter into its layer's weight (``W + alpha/r · B A`` per adapter) and put the plain layers back;
    drops ``model.config.lora``. Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge(adapter_names=list(module.lora_A.keys()))
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
                merged += 1
    if hasattr(model.config, "lora"):
        del model.config.lora
    return merged
