"""Vision-language chat models on the training core (LLaVA / LLaVA-Med / Vision-BioLLM): a CLIP or SigLIP vision
tower, a projector and a causal LM as transformers' ``LlavaForConditionalGeneration``
(:mod:`biomedgpt.model.vision_chat`), trained stage by stage with the parameters ``model.trainable`` names and the
rest frozen (the vision tower always): ``vlm_align`` trains the projector alone on captions (LLaVA-1.5 stage 1).

Loss: next-token cross entropy on the assistant's tokens only (the chat template's labels), computed in chunks inside
the output projection as for the causal LM (:class:`~biomedgpt.train.recipes.causal_lm.CausalLMForTraining`).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from biomedgpt.checkpoint.layout import TOKENIZER_DIR
from biomedgpt.data.chat_templates import IGNORE_INDEX, IMAGE_PLACEHOLDER
from biomedgpt.model.vision_chat import (
    add_lora,
    assemble_vision_chat_model,
    build_vision_chat_model,
    image_feature_count,
    lora_parameter_patterns,
    lora_targets,
    projector_layers,
    vision_chat_config,
)
from biomedgpt.train.config import deepspeed_config_path
from biomedgpt.train.decoder_flops import decoder_forward_flops
from biomedgpt.train.engine import zero_stage
from biomedgpt.train.recipes.base import DataPlan, Recipe, StepLoss
from biomedgpt.train.recipes.causal_lm import CausalLMForTraining
from biomedgpt.train.recipes.vision_chat_config import PROJECTOR_PREFIX, VISION_TOWER_PREFIX, VisionChatTrainConfig

__all__ = ["VisionChatForTraining", "VisionChatRecipe", "apply_trainable"]

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


class VisionChatForTraining(CausalLMForTraining):
    """The Llava model (``.model``) with the chunked next-token loss; images go in as ``pixel_values``."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> Any:
        llava = self.model.model  # LlavaModel: the tower, the projector and the LM without its head
        dtype = next(llava.multi_modal_projector.parameters()).dtype  # the images in the weights' precision
        if pixel_values is not None:
            pixel_values = pixel_values.to(dtype)
        out = self.loss_of_hidden(
            llava(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
            ).last_hidden_state,
            labels,
        )
        if pixel_values is None:
            # A batch without images (text-only conversations) still runs the tower and the projector, on a blank
            # image at weight 0 (as LLaVA does): every rank runs the same modules (ZeRO-3 gathers them collectively,
            # ZeRO-2 reduces the same gradients) and a projector-only stage still has a gradient.
            size = int(self.model.config.vision_config.image_size)
            blank = torch.zeros(1, 3, size, size, dtype=dtype, device=input_ids.device)
            features = llava.get_image_features(pixel_values=blank)
            out = dataclasses.replace(out, loss=out.loss + 0.0 * sum(f.sum() for f in features))
        return out


def apply_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter but those whose name matches one of ``patterns`` (never the vision tower's); returns the
    trainable names. A pattern that matches nothing is an error naming it (a misspelt one would train nothing)."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        parts = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ValueError(f"model.trainable patterns {unmatched} match no parameter (the model's parts: {parts})")
    trainable = []
    for name, parameter in model.named_parameters():
        tower = name.startswith(VISION_TOWER_PREFIX)  # frozen whatever a broad pattern (*.bias, *proj*) matches
        parameter.requires_grad_(not tower and any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def vision_flops(config: Any, images: int) -> int:
    """Matmul FLOPs of the vision tower over ``images`` (projections, MLP and attention of every layer; the patch
    embedding and norms are left out, as for the LM)."""
    hidden, ffn = int(config.hidden_size), int(config.intermediate_size)
    tokens = (int(config.image_size) // int(config.patch_size)) ** 2 + 1
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * tokens * hidden
    return images * int(config.num_hidden_layers) * per_layer


class VisionChatRecipe(Recipe):
    name = "vision_chat"

    config: VisionChatTrainConfig

    @classmethod
    def check_environment(cls, config: VisionChatTrainConfig) -> None:
        """QLoRA (``model.lora.quantize``) needs CUDA and bitsandbytes: refused before any process group otherwise."""
        lora = config.model.lora
        if lora is None or lora.quantize is None:
            return
        if config.model.init_from is None:
            raise ValueError("model.lora.quantize: QLoRA quantizes a trained model as it loads: set model.init_from")
        ds_path = deepspeed_config_path(config.deepspeed_config)
        if zero_stage(json.loads(ds_path.read_text())) == 3:
            raise ValueError(
                f"model.lora.quantize with deepspeed_config={config.deepspeed_config}: ZeRO-3 does not partition the "
                "4-bit weights here; use ZeRO-2 (zero2_bf16.json): a frozen 4-bit model fits where a full one does not"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"model.lora.quantize={lora.quantize}: 4-bit QLoRA runs on CUDA GPUs only (bitsandbytes' kernels) and "
                "this machine has none; train LoRA on full-precision weights here (drop model.lora.quantize)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                f"model.lora.quantize={lora.quantize} needs bitsandbytes: pip install -e '.[qlora]' (or bitsandbytes)"
            )

    def build_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        section = self.config.model
        tokenizer = AutoTokenizer.from_pretrained(self.config.data.tokenizer or section.init_from or section.language)
        if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
        return tokenizer

    @classmethod
    def model_config(cls, config: VisionChatTrainConfig, image_token_id: int) -> Any:
        section = config.model
        if section.init_from is not None:
            from transformers import AutoConfig

            if not (Path(section.init_from) / "config.json").is_file():  # never a hub name: no network lookups
                raise ValueError(
                    f"model.init_from={section.init_from}: no config.json there; the previous stage's model "
                    "(biomedgpt-consolidate CKPT_DIR OUT_DIR) is needed to plan or train this one"
                )
            return AutoConfig.from_pretrained(section.init_from)
        return vision_chat_config(
            section.vision or dict(section.vision_config or {}),
            section.language or dict(section.language_config or {}),
            image_token_id=image_token_id,
            feature_layer=section.feature_layer,
            select=section.select,
        )

    @classmethod
    def plan_model(cls, config: VisionChatTrainConfig) -> tuple[nn.Module, list[str]]:
        language = config.model.language_config or {}
        model_config = cls.model_config(config, image_token_id=int(language.get("vocab_size", 32000)) - 1)
        projector = getattr(model_config, "projector_type", config.model.projector)
        with torch.device("meta"):
            model = build_vision_chat_model(model_config, projector)
        trainable = apply_trainable(model, config.model.trainable)
        total = sum(p.numel() for p in model.parameters())
        count = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
        return model, [f"llava ({config.model.projector}): {total:,} parameters, {count:,} trainable"]

    def build_model(self, ds_config: Mapping[str, Any]) -> nn.Module:
        section = self.config.model
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        config = self.model_config(self.config, image_token_id)
        config.text_config._attn_implementation = section.attn_implementation
        config.vision_config._attn_implementation = section.attn_implementation
        if section.init_from is not None:
            if config.image_token_index != image_token_id:
                raise ValueError(
                    f"model.init_from={section.init_from} puts images at token {config.image_token_index} but the "
                    f"tokenizer's {IMAGE_PLACEHOLDER} is {image_token_id}: use the tokenizer saved with that model"
                )
            quantize = section.lora.quantize if section.lora is not None else None
            model = self._load_previous_stage(section.init_from, config, ds_config, section.previous_lora, quantize)
        elif section.vision or section.language:
            zero3 = copy.deepcopy(dict(ds_config)) if zero_stage(dict(ds_config)) == 3 else None
            model = assemble_vision_chat_model(config, section.projector, section.vision, section.language, zero3)
        elif zero_stage(dict(ds_config)) == 3:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(dict(ds_config))):
                model = build_vision_chat_model(config, section.projector)
        else:
            model = build_vision_chat_model(config, section.projector)
        if len(self.tokenizer) > config.text_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} ids (with {IMAGE_PLACEHOLDER}) but the language model has "
                f"vocab_size={config.text_config.vocab_size}; give a language model whose vocabulary holds it"
            )
        patterns = list(section.trainable)
        model.config.trainable = list(patterns)  # what trains beside the adapters: biomedgpt-merge-lora --adapter-out
        # How prompts were written, for biomedgpt-eval / biomedgpt-generate on the consolidated directory.
        model.config.chat = {"template": self.config.data.template, "system": self.config.data.system}
        if section.lora is not None:
            lora = section.lora
            targets = lora_targets(model, tuple(lora.exclude), lora.targets)
            name = add_lora(model, lora.r, lora.alpha, lora.dropout, targets=targets)
            patterns += lora_parameter_patterns(name)
        apply_trainable(model, patterns)
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return VisionChatForTraining(model, section.loss_chunk_size)

    @staticmethod
    def _load_previous_stage(
        directory: str, config: Any, ds_config: Mapping[str, Any], previous_lora: str, quantize: str | None = None
    ) -> nn.Module:
        """A consolidated vision_chat model, loaded partitioned under ZeRO-3 (transformers' DeepSpeed integration).
        Its LoRA adapters, if any, are merged into the weights or kept (``previous_lora``); a model with adapters is
        loaded whole and partitioned by the engine (PEFT's layers are not transformers' layout). ``quantize="4bit"``
        (QLoRA, GPU only, see :meth:`check_environment`) stores the language model's linear weights in 4-bit NF4 with
        double quantization (QLoRA's recipe), computing in bf16; the tower, projector and head stay as they are."""
        from transformers.integrations import HfDeepSpeedConfig

        from biomedgpt.model.vision_chat import load_vision_chat_model, lora_adapters, merge_lora_layers

        zero3 = zero_stage(dict(ds_config)) == 3
        adapters = lora_adapters(config)
        if zero3 and not adapters and projector_layers(getattr(config, "projector_type", "mlp2x_gelu")) != 2:
            raise ValueError(
                f"model.init_from={directory}: a {config.projector_type} projector loads under ZeRO-2 only (ZeRO-3 "
                "loading goes through transformers' Llava, whose projector is mlp2x_gelu)"
            )
        keep = HfDeepSpeedConfig(copy.deepcopy(dict(ds_config))) if zero3 and not adapters else None
        extra: dict[str, Any] = {}
        if quantize is not None:
            if adapters:
                raise ValueError(f"model.init_from={directory}: for QLoRA, merge its adapters (biomedgpt-merge-lora)")
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
            )  # fmt: skip
            # CUDA when training (check_environment); bitsandbytes also quantizes on CPU, where it is tested.
            extra["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        model, info = load_vision_chat_model(
            directory, attn_implementation=config.text_config._attn_implementation, **extra
        )
        del keep
        problems = [f"{kind}: {', '.join(keys[:5])}" for kind, keys in info.items() if keys]
        if problems:
            raise ValueError(f"model.init_from={directory}: the weights do not fit the model ({'; '.join(problems)})")
        if adapters and previous_lora == "merge":
            merge_lora_layers(model)
        return model

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # The projector may learn at its own rate (LLaVA-1.5 stage 2: 2e-5 beside LoRA's 2e-4); no weight decay on
        # biases and norms.
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                shape = getattr(parameter, "ds_shape", parameter.shape)
                key = (name.startswith("model." + PROJECTOR_PREFIX), len(shape) >= 2)
                groups.setdefault(key, []).append(parameter)
        out = []
        projector_lr = self.config.model.projector_lr or self.config.optim.lr
        for (projector, decayed), parameters in sorted(groups.items()):
            group: dict[str, Any] = {"params": parameters, "lr": projector_lr if projector else self.config.optim.lr}
            if not decayed:
                group["weight_decay"] = 0.0
            out.append(group)
        return out

    def image_processor(self) -> Any:
        from biomedgpt.data.vision_chat import image_processor_for

        section = self.config.model
        vision = section.init_from or section.vision or dict(section.vision_config or {})
        size = int((section.vision_config or {}).get("image_size", 224))
        return image_processor_for(vision, size)

    def example_builder(self) -> Any:
        from biomedgpt.data.vision_chat import ChatExampleBuilder

        data = self.config.data
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        return ChatExampleBuilder(
            self.tokenizer,
            self.image_processor(),
            data.template,
            image_features=image_feature_count(self.model_config(self.config, image_token_id)),
            max_length=data.max_length,
            system=data.system,
        )

    def collator(self) -> Any:
        from biomedgpt.data.vision_chat import VisionChatCollator

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return VisionChatCollator(int(pad))

    def build_data(self) -> DataPlan:
        from biomedgpt.data.pipeline import make_loader
        from biomedgpt.data.vision_chat import ConversationStream

        data, batch = self.config.data, self.config.batch
        dataset = ConversationStream(
            str(data.train),
            self.example_builder(),
            batch_size=batch.micro_batch_size,
            shuffle=data.shuffle,
            shuffle_algo=data.shuffle_algo,
            shuffle_seed=data.seed,
            num_canonical_nodes=data.num_canonical_nodes,
        )
        loader = make_loader(dataset, batch.micro_batch_size, self.collator(), data.num_workers)
        return DataPlan(dataset, loader, ["main"])

    def build_validator(self, rank: int, world_size: int, device: torch.device) -> Any | None:
        """Perplexity of the assistant's tokens on held-out conversation shards (``validation.data``)."""
        from biomedgpt.train.perplexity import perplexity_validator

        return perplexity_validator(
            self.config, collator=self.collator(), model_inputs=self.model_inputs, rank=rank, world_size=world_size,
            device=device, example=self.example_builder(),
        )  # fmt: skip

    def target_tokens(self, batch: Any, completed_steps: int) -> int:
        return int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if key in batch}

    def forward_loss(self, engine: Any, batch: Any, completed_steps: int, device: torch.device) -> StepLoss:
        out = engine(**self.model_inputs(batch, device))
        return StepLoss(out.loss, out.per_example, out.per_example_tokens)

    def input_tokens(self, batch: Any) -> int:
        return int(batch["attention_mask"].sum())

    def forward_flops(self, model: nn.Module, batch: Any) -> int:
        config = model.model.config
        batch_size, seq_len = batch["input_ids"].shape
        images = int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0
        return decoder_forward_flops(config.text_config, int(batch_size), int(seq_len)) + vision_flops(
            config.vision_config, images
        )

    def write_run_files(self, checkpoint_dir: Path, model: nn.Module) -> None:
        model.model.config.save_pretrained(checkpoint_dir)
        self.tokenizer.save_pretrained(checkpoint_dir / TOKENIZER_DIR)
        self.image_processor().save_pretrained(checkpoint_dir / TOKENIZER_DIR)

    def tracking_tags(self) -> dict[str, str]:
        section = self.config.model
        language = section.language or str((section.language_config or {}).get("model_type"))
        return {"model": f"llava:{language}", "projector": section.projector, "template": self.config.data.template}
