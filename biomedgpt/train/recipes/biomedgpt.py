"""BiomedGPT (OFA architecture) on the training core: pretraining on the four-source mixture and fine-tuning on the
five downstream tasks, as the original recipe (BiomedGPT scripts/pretrain/*.sh and scripts/<task>/train_*.sh).

Loss: label-smoothed cross entropy with per-example weights, answer-trie constraint masks and worst-token dropping
(BiomedGPT criterions/label_smoothed_cross_entropy.py, adjust_label_smoothed_cross_entropy), optionally fused with
the tied output projection; pretraining micro-batches hold two sub-batches (``v1``: image-text tasks, ``v2``: text,
image and detection), each normalised by its own target tokens.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from biomedgpt.checkpoint.layout import TOKENIZER_DIR
from biomedgpt.data.examples import images_on_device
from biomedgpt.data.finetune_tasks import load_answer_list, write_task_file
from biomedgpt.data.pretrain_tasks import AUXILIARY_TASKS, IMAGE_TEXT_TASKS
from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.tasks import FINETUNE_TASK_NAMES, PRETRAIN
from biomedgpt.tokenizer import BiomedGPTTokenizer
from biomedgpt.train.config import TrainConfig
from biomedgpt.train.engine import check_attention_backend, zero_stage
from biomedgpt.train.flops import forward_flops
from biomedgpt.train.fused_loss import fused_loss_parts, loss_output_from_parts
from biomedgpt.train.loss import kept_token_count, label_smoothed_cross_entropy
from biomedgpt.train.recipes.base import DataPlan, Recipe, StepLoss
from biomedgpt.train.validation import Validator, finetune_task_config

MODEL_INPUTS = ("input_ids", "patch_images", "patch_masks", "decoder_input_ids", "code_masks", "patch_indices")


def model_config_for(config: TrainConfig, vocab_size: int) -> BiomedGPTConfig:
    section = config.model
    return BiomedGPTConfig.for_size(
        section.size,
        vocab_size=vocab_size,
        attention_backend=section.attention_backend,
        resnet_norm=section.resnet_norm,
        dropout=section.dropout,
        encoder_drop_path_rate=section.encoder_drop_path_rate,
        decoder_drop_path_rate=section.decoder_drop_path_rate,
    )


def load_tokenizer(config: TrainConfig) -> BiomedGPTTokenizer:
    if config.data.tokenizer:
        return BiomedGPTTokenizer.from_pretrained(config.data.tokenizer)
    return BiomedGPTTokenizer.default()


def build_model(config: TrainConfig, tokenizer: BiomedGPTTokenizer, ds_config: Mapping[str, Any]) -> torch.nn.Module:
    """From scratch under ``zero.Init`` for ZeRO-3 (no rank holds the whole model), or from ``model.init_from``."""
    import deepspeed

    check_attention_backend(config)

    from biomedgpt.model.layers import apex_layer_norm_allowed
    from biomedgpt.train.activation_checkpointing import apply_activation_checkpointing, compile_layers

    with apex_layer_norm_allowed(config.model.apex_layer_norm):
        if config.model.init_from:
            model = BiomedGPTForConditionalGeneration.from_pretrained(config.model.init_from)
            if model.config.vocab_size != len(tokenizer):
                raise ValueError(
                    f"{config.model.init_from} has vocab_size={model.config.vocab_size} but the tokenizer has "
                    f"{len(tokenizer)} ids; use the tokenizer saved with that model (data.tokenizer)"
                )
        elif zero_stage(ds_config) == 3:
            with deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(dict(ds_config))):
                model = BiomedGPTForConditionalGeneration(model_config_for(config, len(tokenizer)))
        else:
            model = BiomedGPTForConditionalGeneration(model_config_for(config, len(tokenizer)))
    if config.model.freeze_embedding:
        model.set_embedding_trainable(False)
    apply_activation_checkpointing(model, config.model.activation_checkpointing)
    if config.model.compile_layers:
        compile_layers(model)
    return model


def build_data(config: TrainConfig, tokenizer: Any) -> DataPlan:
    """The streamed dataset, its loader and the names of the sub-batches each micro-batch holds."""
    from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder
    from biomedgpt.data.pipeline import (
        FinetuneCollator,
        FinetuneStream,
        MixtureConfig,
        PretrainCollator,
        PretrainStream,
        make_loader,
    )
    from biomedgpt.data.pretrain_tasks import NegativeSamples, PretrainExampleBuilder, PretrainTaskConfig

    data = config.data
    streaming_kwargs = dict(
        batch_size=config.batch.micro_batch_size,
        shuffle=data.shuffle,
        shuffle_algo=data.shuffle_algo,
        shuffle_seed=data.seed,
        num_canonical_nodes=data.num_canonical_nodes,
    )
    if data.task == PRETRAIN:
        if not data.negative_samples:
            raise ValueError("pretraining needs data.negative_samples (type2ans.json, object.txt, all_captions.txt)")
        builder = PretrainExampleBuilder(
            tokenizer,
            NegativeSamples.load(data.negative_samples),
            PretrainTaskConfig(patch_image_size=data.patch_image_size, sample_patch_num=data.sample_patch_num),
        )
        mixture = MixtureConfig(data.mixture_period, data.mixture_text, data.mixture_image, data.mixture_detection)
        dataset = PretrainStream(
            builder,
            data.vision_language,
            data.text,
            data.image,
            data.detection,
            mixture,
            data.seed,
            data.remote_root,
            **streaming_kwargs,
        )
        collator = PretrainCollator(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        keys = ["v1", "v2"]
    else:
        builder = FinetuneExampleBuilder(
            tokenizer, finetune_task_config(config), load_answer_list(data.answers) if data.answers else None
        )
        dataset = FinetuneStream(builder, data.train, seed=data.seed, **streaming_kwargs)
        collator = FinetuneCollator(tokenizer.pad_id, len(tokenizer))
        keys = ["main"]
    loader = make_loader(dataset, config.batch.micro_batch_size, collator, data.num_workers)
    return DataPlan(dataset, loader, keys)


class BiomedGPTRecipe(Recipe):
    name = "biomedgpt"
    task_names = (*IMAGE_TEXT_TASKS, *AUXILIARY_TASKS, *FINETUNE_TASK_NAMES)

    config: TrainConfig
    tokenizer: BiomedGPTTokenizer

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.pretraining = config.data.task == PRETRAIN

    def build_tokenizer(self) -> BiomedGPTTokenizer:
        return load_tokenizer(self.config)

    @classmethod
    def plan_model(cls, config: TrainConfig) -> tuple[torch.nn.Module, list[str]]:
        from biomedgpt.model import count_trainable_parameters
        from biomedgpt.model.config import ORIGINAL_VOCAB_SIZE

        notes = []
        try:
            vocab_size = len(load_tokenizer(config))
        except (OSError, ValueError, RuntimeError) as error:  # planning before the files are in place (or damaged)
            vocab_size = ORIGINAL_VOCAB_SIZE
            notes.append(f"({error}; assuming the original {ORIGINAL_VOCAB_SIZE:,}-token vocabulary)")
        with torch.device("meta"):
            model = BiomedGPTForConditionalGeneration(model_config_for(config, vocab_size))
        trainable = count_trainable_parameters(model)
        total = sum(p.numel() for p in model.parameters())
        line = f"size {config.model.size}: {total:,} parameters ({trainable:,} trainable), vocabulary {vocab_size:,}"
        return model, [line, *notes]

    @classmethod
    def check_environment(cls, config: TrainConfig) -> None:
        check_attention_backend(config)

    def build_model(self, ds_config: Mapping[str, Any]) -> torch.nn.Module:
        return build_model(self.config, self.tokenizer, ds_config)

    def parameter_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        # Decoupled weight decay on *all* parameters, as the original (no bias/LayerNorm exclusion).
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def build_data(self) -> DataPlan:
        return build_data(self.config, self.tokenizer)

    def sub_batches(self, micro_batch: Any) -> dict[str, Any]:
        return micro_batch if self.pretraining else {"main": micro_batch}

    def target_tokens(self, batch: Any, completed_steps: int) -> int:
        return kept_token_count(batch["ntokens"], self.config.optim.drop_worst_ratio_at(completed_steps))

    def forward_loss(self, engine: Any, batch: Any, completed_steps: int, device: torch.device) -> StepLoss:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # The loader hands over uint8 images: they are normalised (and cast) here, on the training device.
        batch = images_on_device(moved, torch.bfloat16 if self.config.precision == "bf16" else None)
        inputs = {key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None}
        loss_args = dict(
            epsilon=self.config.optim.label_smoothing,
            padding_idx=self.tokenizer.pad_id,
            example_weights=batch["weights"],
            constraint_masks=batch.get("constraint_masks"),  # the fused loss applies them chunk by chunk
            drop_worst_ratio=self.config.optim.drop_worst_ratio_at(completed_steps),
        )
        if self.config.optim.fused_loss:
            # Computed inside the model's output projection (see TiedOutputProjection): no [B, T, V] logits.
            hidden_state_loss = functools.partial(
                fused_loss_parts, target=batch["target"], chunk_size=self.config.optim.fused_loss_chunk_size,
                **loss_args,
            )  # fmt: skip
            out = loss_output_from_parts(engine(**inputs, hidden_state_loss=hidden_state_loss).loss_parts)
        else:
            out = label_smoothed_cross_entropy(engine(**inputs).logits, batch["target"], **loss_args)
        return StepLoss(out.loss, out.per_example, out.per_example_tokens)  # tokens: the kept ones when dropping

    def example_tasks(self, batch: Any) -> list[str]:
        return list(batch["tasks"])

    def input_tokens(self, batch: Any) -> int:
        pad = self.tokenizer.pad_id
        return int(batch["input_ids"].ne(pad).sum()) + int(batch["decoder_input_ids"].ne(pad).sum())

    def forward_flops(self, model: torch.nn.Module, batch: Any) -> int:
        images = batch.get("patch_images")
        kept = batch.get("patch_indices")
        return forward_flops(
            model.config,
            int(batch["input_ids"].shape[0]),
            int(batch["input_ids"].shape[1]),
            int(batch["decoder_input_ids"].shape[1]),
            None if images is None else (int(images.shape[-2]), int(images.shape[-1])),
            None if kept is None else int(kept.shape[1]),
        )

    def write_run_files(self, checkpoint_dir: Path, model: torch.nn.Module) -> None:
        # What a consolidated model needs besides the weights (biomedgpt-consolidate reads these).
        model.config.save_pretrained(checkpoint_dir)
        self.tokenizer.save_pretrained(checkpoint_dir / TOKENIZER_DIR)
        if not self.pretraining:
            data = self.config.data
            answers = load_answer_list(data.answers) if data.answers else None
            write_task_file(checkpoint_dir, finetune_task_config(self.config), answers)

    def tracking_tags(self) -> dict[str, str]:
        return {"size": self.config.model.size, "task": self.config.data.task}

    def build_validator(self, rank: int, world_size: int, device: torch.device) -> Validator | None:
        if not self.config.validation.data:
            return None
        return Validator(self.config, self.tokenizer, rank, world_size, device)
