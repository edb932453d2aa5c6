"""The model families a consolidated directory can hold, chosen by the ``model_type`` of the checkpoint's
``config.json``: BiomedGPT (``biomedgpt``), or any Hugging Face causal LM (``llama``, ``mistral``, ``qwen2``,
``gpt2``, ... as ``AutoModelForCausalLM`` knows them; the ``causal_lm`` recipe's runs), or a vision-language chat
model (``llava``, the ``vision_chat`` recipe's runs).

A format says how to read the config and tokenizer, how to build the model on the meta device (its state-dict keys,
shapes and ties: the layout of the output), where the model's weights sit in the training engine's module (the
``causal_lm`` recipe trains the Hugging Face model as ``.model`` of a wrapper that adds the chunked loss), how to load
the result, and a small batch for the verification's forward pass.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch

from biomedgpt.checkpoint.errors import ConsolidationError

__all__ = [
    "BiomedGPTFormat",
    "CausalLMFormat",
    "ModelFormat",
    "VisionChatFormat",
    "format_for_config",
    "format_for_model_type",
]


class ModelFormat(ABC):
    #: Key prefixes the model's weights may carry in the training engine's state, tried in order.
    weight_prefixes: tuple[str, ...] = ("",)

    @abstractmethod
    def config_from_dict(self, data: dict[str, Any], origin: str) -> Any:
        """The model config of a ``config.json`` read into ``data``."""

    @abstractmethod
    def read_tokenizer(self, path: Path) -> Any:
        """The tokenizer saved in directory ``path``."""

    @abstractmethod
    def tokenizer_mismatch(self, tokenizer: Any, config: Any) -> str | None:
        """The rule ``tokenizer`` breaks by its size against ``config.vocab_size``, or None."""

    @abstractmethod
    def meta_model(self, config: Any) -> torch.nn.Module:
        """The model built on the meta device (no memory): its state dict is the output's layout."""

    @abstractmethod
    def load(self, directory: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
        """The model loaded from a written directory with ``from_pretrained``, and transformers' loading info."""

    @abstractmethod
    def dummy_batch(self, config: Any) -> dict[str, torch.Tensor]:
        """A small fixed batch for a forward pass (the verification's logits)."""

    def is_config(self, config: Any) -> bool:
        return False

    def weight_prefix(self, first_key: str, names: Container[str]) -> str:
        """The prefix under which the checkpoint holds ``first_key`` (the layout's first key), default the first."""
        return next((p for p in self.weight_prefixes if p + first_key in names), self.weight_prefixes[0])


class BiomedGPTFormat(ModelFormat):
    def config_from_dict(self, data: dict[str, Any], origin: str) -> Any:
        from biomedgpt.model import BiomedGPTConfig

        try:
            return BiomedGPTConfig.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ConsolidationError(f"{origin}: not a valid BiomedGPT config ({error})") from error

    def is_config(self, config: Any) -> bool:
        from biomedgpt.model import BiomedGPTConfig

        return isinstance(config, BiomedGPTConfig)

    def read_tokenizer(self, path: Path) -> Any:
        from biomedgpt.tokenizer import BiomedGPTTokenizer

        return BiomedGPTTokenizer.from_pretrained(path)

    def tokenizer_mismatch(self, tokenizer: Any, config: Any) -> str | None:
        if len(tokenizer) != config.vocab_size:  # the embedding rows are exactly the vocabulary
            return "the ids must be exactly the embedding rows"
        return None

    def meta_model(self, config: Any) -> torch.nn.Module:
        from biomedgpt.model import BiomedGPTForConditionalGeneration

        with torch.device("meta"):
            return BiomedGPTForConditionalGeneration(config)

    def load(self, directory: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
        from biomedgpt.model import BiomedGPTForConditionalGeneration

        return BiomedGPTForConditionalGeneration.from_pretrained(directory, output_loading_info=True)

    def dummy_batch(self, config: Any) -> dict[str, torch.Tensor]:
        """Two rows, one with an image and one text-only, from a fixed seed."""
        generator = torch.Generator().manual_seed(0)
        high = min(config.vocab_size, 1000)
        return {
            "input_ids": torch.randint(4, high, (2, 10), generator=generator),
            "patch_images": torch.randn(2, 3, 64, 64, generator=generator),
            "patch_masks": torch.tensor([True, False]),
            "decoder_input_ids": torch.randint(4, high, (2, 6), generator=generator),
        }


class CausalLMFormat(ModelFormat):
    # The causal_lm recipe's engine wraps the Hugging Face model as ``.model`` (its loss wrapper); a checkpoint of
    # the bare model has no prefix.
    weight_prefixes = ("model.", "")

    def config_from_dict(self, data: dict[str, Any], origin: str) -> Any:
        from transformers import AutoConfig

        settings = dict(data)
        try:
            return AutoConfig.for_model(settings.pop("model_type"), **settings)
        except (TypeError, ValueError) as error:
            raise ConsolidationError(f"{origin}: not a valid {data.get('model_type')} config ({error})") from error

    def is_config(self, config: Any) -> bool:
        from transformers import PretrainedConfig

        return isinstance(config, PretrainedConfig) and causal_lm_model_type(config.model_type)

    def read_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def tokenizer_mismatch(self, tokenizer: Any, config: Any) -> str | None:
        # Hugging Face models often pad the embedding past the tokenizer (to a multiple of 64 or 128): only more
        # ids than rows is wrong.
        if len(tokenizer) > config.vocab_size:
            return "more ids than embedding rows"
        return None

    def meta_model(self, config: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    def load(self, directory: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, dtype="auto")

    def dummy_batch(self, config: Any) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, min(config.vocab_size, 1000), (2, 12), generator=generator)}


class VisionChatFormat(CausalLMFormat):
    """A vision-language chat model (``model_type`` llava, the ``vision_chat`` recipe): transformers'
    ``LlavaForConditionalGeneration`` with the projector its config's ``projector_type`` names."""

    def is_config(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava"

    def meta_model(self, config: Any) -> torch.nn.Module:
        from biomedgpt.model.vision_chat import build_vision_chat_model, lora_adapters, restore_lora

        with torch.device("meta"):
            model = build_vision_chat_model(config, getattr(config, "projector_type", "mlp2x_gelu"))
            adapters = lora_adapters(config)
            if adapters:  # trained adapters are written as they are (unmerged): biomedgpt-merge-lora folds them in
                restore_lora(model, adapters)
        return model

    def load(self, directory: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
        from biomedgpt.model.vision_chat import load_vision_chat_model

        return load_vision_chat_model(directory)

    def tokenizer_mismatch(self, tokenizer: Any, config: Any) -> str | None:
        return super().tokenizer_mismatch(tokenizer, config.text_config)

    def dummy_batch(self, config: Any) -> dict[str, torch.Tensor]:
        from biomedgpt.model.vision_chat import image_feature_count

        generator = torch.Generator().manual_seed(0)
        vision, features = config.vision_config, image_feature_count(config)
        text = torch.randint(0, min(config.text_config.vocab_size, 1000), (2, 8), generator=generator)
        image = torch.full((2, features), config.image_token_index)
        pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=generator)
        return {"input_ids": torch.cat([text[:, :2], image, text[:, 2:]], dim=1), "pixel_values": pixels}


def causal_lm_model_type(model_type: str | None) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def format_for_model_type(model_type: str | None, origin: str) -> ModelFormat:
    if model_type in (None, "biomedgpt"):
        return BiomedGPTFormat()
    if model_type == "llava":
        return VisionChatFormat()
    if causal_lm_model_type(model_type):
        return CausalLMFormat()
    raise ConsolidationError(
        f"{origin}: model_type {model_type!r} is neither 'biomedgpt' nor a causal LM that transformers' "
        "AutoModelForCausalLM builds"
    )


def format_for_config(config: Any) -> ModelFormat:
    """The format of a config object (a BiomedGPTConfig or a transformers causal-LM config)."""
    for candidate in (BiomedGPTFormat(), VisionChatFormat(), CausalLMFormat()):
        if candidate.is_config(config):
            return candidate
    raise ConsolidationError(f"a {type(config).__name__} is neither a BiomedGPT nor a causal-LM model config")


def read_config_file(path: Path) -> tuple[Any, ModelFormat]:
    """The model config in ``path`` (a ``config.json``) and its format."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConsolidationError(f"{path}: not a readable JSON model config ({error})") from error
    if not isinstance(data, dict):
        raise ConsolidationError(f"{path}: holds a JSON {type(data).__name__}, not a model config")
    model_format = format_for_model_type(data.get("model_type"), str(path))
    return model_format.config_from_dict(data, str(path)), model_format
