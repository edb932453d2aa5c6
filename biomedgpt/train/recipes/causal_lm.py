"""Continued pretraining of a Hugging Face causal LM on the training core (BioMedGPT-LM-7B style: Llama-2-7B-chat
trained further on biomedical papers; PharMolix/OpenBioMed).

Model: any ``AutoModelForCausalLM`` directory, loaded partitioned under ZeRO-3 (transformers builds it inside
``deepspeed.zero.Init`` while a ``HfDeepSpeedConfig`` is alive, so a 7B model never sits whole on one rank), or a
model built from an inline config; SDPA attention, optional gradient checkpointing. AdamW without weight decay on
biases and norms (as Llama and the Hugging Face Trainer train), linear or cosine schedule (``optim.schedule``).

Loss: next-token cross entropy, computed inside the output projection's forward in chunks of
``model.loss_chunk_size`` target tokens (:mod:`biomedgpt.train.fused_loss`), so fp32 logits over the vocabulary
never exist for the whole micro-batch; inside that module's forward is where ZeRO-3 has gathered its weight.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from biomedgpt.checkpoint.layout import TOKENIZER_DIR
from biomedgpt.data.token_stream import IGNORE_INDEX, TokenCollator, TokenStream
from biomedgpt.train.decoder_flops import decoder_forward_flops
from biomedgpt.train.engine import zero_stage
from biomedgpt.train.fused_loss import fused_loss_parts, loss_output_from_parts
from biomedgpt.train.recipes.base import DataPlan, Recipe, StepLoss
from biomedgpt.train.recipes.causal_lm_config import CausalLMTrainConfig
from biomedgpt.train.recipes.causal_lm_preflight import model_config

__all__ = ["CausalLMForTraining", "CausalLMRecipe", "model_inputs"]


def _head_forward(self: nn.Linear, hidden: torch.Tensor, hidden_state_loss: Any = None) -> Any:
    """The output projection's forward: logits, or with ``hidden_state_loss`` that loss of its input and weight."""
    if hidden_state_loss is None:
        return F.linear(hidden, self.weight, self.bias)
    return tuple(hidden_state_loss(hidden, self.weight))


class CausalLMForTraining(nn.Module):
    """The Hugging Face model (``.model``) with the chunked next-token loss: what the DeepSpeed engine wraps."""

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"{type(model).__name__}: the chunked loss needs an output projection without bias")
        # The loss runs inside the head's own forward, where ZeRO-3 has gathered its (possibly tied) weight.
        head.forward = types.MethodType(_head_forward, head)
        self.model, self.chunk_size = model, chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        if position_ids is not None:
            # Packed documents (TokenCollator): without a mask, transformers keeps attention inside each run of
            # restarting positions, the padding's run included, so no token sees another document.
            attention_mask = None
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # use_cache=False: with a cache transformers would not read the packing
        return self.loss_of_hidden(hidden, labels)

    def loss_of_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> Any:
        """The summed next-token loss of the final hidden states [B, T, H] against ``labels`` [B, T]."""
        loss = functools.partial(
            fused_loss_parts, target=labels[:, 1:], padding_idx=IGNORE_INDEX, chunk_size=self.chunk_size
        )
        return loss_output_from_parts(self.model.get_output_embeddings()(hidden[:, :-1], hidden_state_loss=loss))


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The collated batch's tensors :class:`CausalLMForTraining` takes, on ``device``."""
    keys = ("input_ids", "attention_mask", "labels", "position_ids")
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}


class CausalLMRecipe(Recipe):
    name = "causal_lm"

    config: CausalLMTrainConfig

    def build_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.config.data.tokenizer or self.config.model.path)

    @classmethod
    def plan_model(cls, config: CausalLMTrainConfig) -> tuple[nn.Module, list[str]]:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(config))
        total = sum(p.numel() for p in model.parameters())
        return model, [f"{model.config.model_type}: {total:,} parameters, vocabulary {model.config.vocab_size:,}"]

    def build_model(self, ds_config: Mapping[str, Any]) -> nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        section = self.config.model
        # While this object lives, transformers builds and loads the model inside zero.Init (ZeRO-3 only).
        keep = HfDeepSpeedConfig(copy.deepcopy(dict(ds_config))) if zero_stage(dict(ds_config)) == 3 else None
        if section.path is not None:
            model = AutoModelForCausalLM.from_pretrained(section.path, attn_implementation=section.attn_implementation)
        else:
            model = AutoModelForCausalLM.from_config(
                model_config(self.config), attn_implementation=section.attn_implementation
            )
        del keep
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return CausalLMForTraining(model, section.loss_chunk_size)

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # No weight decay on biases and norm weights (the one-dimensional parameters), as Llama trains.
        decayed, plain = [], []
        for parameter in model.parameters():
            if parameter.requires_grad:
                shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3 keeps the full shape here
                (decayed if len(shape) >= 2 else plain).append(parameter)
        return [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]

    def build_data(self) -> DataPlan:
        from biomedgpt.data.pipeline import make_loader

        data, batch = self.config.data, self.config.batch
        dataset = TokenStream(
            str(data.train),
            batch_size=batch.micro_batch_size,
            shuffle=data.shuffle,
            shuffle_algo=data.shuffle_algo,
            shuffle_seed=data.seed,
            num_canonical_nodes=data.num_canonical_nodes,
        )
        loader = make_loader(dataset, batch.micro_batch_size, self.collator(), data.num_workers)
        return DataPlan(dataset, loader, ["main"])

    def target_tokens(self, batch: Any, completed_steps: int) -> int:
        return int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())

    def forward_loss(self, engine: Any, batch: Any, completed_steps: int, device: torch.device) -> StepLoss:
        out = engine(**model_inputs(batch, device))
        return StepLoss(out.loss, out.per_example, out.per_example_tokens)

    def input_tokens(self, batch: Any) -> int:
        return int(batch["attention_mask"].sum())

    def forward_flops(self, model: nn.Module, batch: Any) -> int:
        batch_size, seq_len = batch["input_ids"].shape
        return decoder_forward_flops(model.model.config, int(batch_size), int(seq_len))

    def write_run_files(self, checkpoint_dir: Path, model: nn.Module) -> None:
        model.model.config.save_pretrained(checkpoint_dir)
        self.tokenizer.save_pretrained(checkpoint_dir / TOKENIZER_DIR)

    def build_validator(self, rank: int, world_size: int, device: torch.device) -> Any | None:
        from biomedgpt.train.perplexity import perplexity_validator

        return perplexity_validator(
            self.config, collator=self.collator(), model_inputs=model_inputs, rank=rank, world_size=world_size,
            device=device,
        )  # fmt: skip

    def collator(self) -> TokenCollator:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return TokenCollator(int(pad), self.config.data.mask_documents)

    def tracking_tags(self) -> dict[str, str]:
        config = self.config.model
        return {"model": config.path or str((config.config or {}).get("model_type"))}
