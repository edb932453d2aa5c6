"""The BiomedGPT encoder-decoder (OFA architecture) as a transformers model.

The original: BiomedGPT models/ofa/unify_transformer.py (TransformerEncoder, TransformerDecoder) with the layers of
models/ofa/unify_transformer_layer.py. Module and parameter names follow the original fairseq checkpoint layout
(the module names of those files), so importing released weights is a rename of a few keys. Tensors are
batch-first ([B, T, C]); the original works in [T, B, C], which changes no weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput

from biomedgpt.kernels.attention import require_triton
from biomedgpt.kernels.bias import AttentionBias, ImageRelativeBias, TextRelativeBias
from biomedgpt.model.attention import BiomedGPTAttention
from biomedgpt.model.config import BiomedGPTConfig
from biomedgpt.model.generation import DecodingConfig, generate
from biomedgpt.model.layers import DecoderLayer, EncoderLayer, layer_norm
from biomedgpt.model.positions import (
    decoder_image_position_ids,
    image_position_ids,
    image_relative_bucket_count,
    image_relative_buckets,
    text_relative_buckets,
)
from biomedgpt.model.resnet import FrozenBatchNorm2d, ResNetBackbone

# One decoder layer's cache: self-attention keys, values, then the encoder's projected keys, values.
LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
DecoderCache = tuple[LayerCache, ...]
# A training loss computed from the decoder's final states [B, T, d] and the tied output-projection weight [V, d]
# instead of from logits (a fused loss that never holds [B, T, V]); it returns tensors only, so that ZeRO-3's hooks
# see them (DeepSpeed runtime/zero/parameter_offload.py walks tuples, lists, dicts and tensors).
HiddenStateLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass
class BiomedGPTHiddenStateLossOutput(ModelOutput):
    """What ``forward(..., hidden_state_loss=f)`` returns: ``f``'s tensors, no logits."""

    loss_parts: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


class TiedOutputProjection(nn.Linear):
    """The output projection, whose weight is the shared embedding; with ``hidden_state_loss`` it returns that
    loss of its input and weight instead of logits.

    Computing the loss inside this module's forward is what makes it work under ZeRO-3: the partitioned weight is
    gathered only while a module owning it runs, and again in backward when the gradient reaches that module's
    outputs (the loss's tensors here), so the loss's own backward sees the whole weight.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, hidden_state_loss: HiddenStateLoss | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if hidden_state_loss is None:
            return super().forward(x)
        return tuple(hidden_state_loss(x, self.weight))


@dataclass
class BiomedGPTEncoderOutput(ModelOutput):
    """Encoder states plus what the decoder needs besides them.

    padding_mask: [B, S] True where a position is padding (text pads, patches of samples without an image).
    position_embeddings: [B, S, d] LayerNormed absolute position embeddings, the keys of the cross-attention
    position bias.
    """

    last_hidden_state: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    position_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _heads_first(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., T, d] -> [..., H, T, d/H]."""
    *lead, length, dim = x.shape
    return x.view(*lead, length, num_heads, dim // num_heads).transpose(-2, -3)


def _position_bias(
    q_linear: nn.Linear, k_linear: nn.Linear, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int, scaling: float
) -> torch.Tensor:
    """Decoupled absolute-position attention bias: (q_linear(Pq) * s) @ k_linear(Pk)^T per head."""
    query = _heads_first(q_linear(q_pos), num_heads) * scaling
    key = _heads_first(k_linear(k_pos), num_heads)
    return torch.matmul(query, key.transpose(-1, -2))


def _negative_infinity_where(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _uses_fused_attention(layers: nn.ModuleList) -> bool:
    """Whether the layers run the ``triton`` backend, which takes the bias as its parts (an AttentionBias)."""
    return layers[0].self_attn.backend == "triton"


def _position_projections(
    q_linear: nn.Linear, k_linear: nn.Linear, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of ``_position_bias`` ([.., H, Tq, d] scaled, [.., H, Tk, d]), for the fused kernels."""
    return _heads_first(q_linear(q_pos), num_heads) * scaling, _heads_first(k_linear(k_pos), num_heads)


def _whole_table(table: nn.Embedding) -> torch.Tensor:
    """All rows of a bucket table, read through the module: under ZeRO-3 its weight is gathered only when the
    module itself is called, and the gradient flows back through this lookup."""
    return table(torch.arange(table.num_embeddings, device=table.weight.device))


class BiomedGPTEncoder(nn.Module):
    """ResNet patches + text tokens -> contextual states; image tokens come first."""

    def __init__(self, config: BiomedGPTConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        dim, eps, heads = config.d_model, config.layer_norm_eps, config.encoder_attention_heads
        self.num_heads = heads
        self.grid_size = config.image_bucket_size
        self.pad_token_id = config.pad_token_id
        self.pos_scaling = (dim // heads * config.attn_scale_factor) ** -0.5
        self.embed_tokens = embed_tokens
        self.type_embedding = nn.Embedding(2, dim)
        self.layernorm_embedding = layer_norm(dim, eps)
        self.embed_images = ResNetBackbone(config.resnet_layers, config.resnet_norm, config.resnet_drop_path_rate)
        self.image_proj = nn.Linear(config.image_feature_dim, dim)
        self.patch_layernorm_embedding = layer_norm(dim, eps)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, dim)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, dim)
        self.pos_ln = layer_norm(dim, eps)
        self.image_pos_ln = layer_norm(dim, eps)
        self.pos_q_linear = nn.Linear(dim, dim)
        self.pos_k_linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.dropout)
        rates = torch.linspace(0, config.encoder_drop_path_rate, config.encoder_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(EncoderLayer(config, rate) for rate in rates)
        self.layer_norm = layer_norm(dim, eps)
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * config.token_bucket_size - 1, heads) for _ in range(config.encoder_layers)
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(image_relative_bucket_count(config.image_bucket_size), heads)
            for _ in range(config.encoder_layers)
        )
        # Not learned: rebuilt rather than saved (the original saved them; importers drop those keys).
        self.register_buffer(
            "token_rp_bucket",
            text_relative_buckets(config.token_bucket_size, config.max_position_embeddings),
            persistent=False,
        )
        self.register_buffer("image_rp_bucket", image_relative_buckets(config.image_bucket_size), persistent=False)

    def embed_image(
        self,
        patch_images: torch.Tensor,
        patch_masks: torch.Tensor | None,
        sample_patch_num: int | None,
        generator: torch.Generator | None,
        patch_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns patch embeddings [B,P,d], their padding mask [B,P] and position ids [B,P]."""
        features = self.embed_images(patch_images)
        batch, _, height, width = features.shape
        features = features.flatten(2).transpose(1, 2)
        position_ids = image_position_ids(height, width, self.grid_size, features.device).expand(batch, -1)
        keep = None
        if patch_indices is not None:
            # Chosen by the data pipeline from each sample's own seed, so re-sharded runs keep the same patches.
            if int(patch_indices.max()) >= height * width:
                raise ValueError(f"patch_indices reach {int(patch_indices.max())} but the image has {height * width}")
            keep = patch_indices.to(features.device)
        elif sample_patch_num is not None and 0 < sample_patch_num < height * width:
            # Pretraining keeps a random subset of patches, drawn independently per sample (BiomedGPT
            # models/ofa/unify_transformer.py, TransformerEncoder.get_patch_images_info).
            scores = torch.rand(batch, height * width, generator=generator, device="cpu").to(features.device)
            keep = scores.argsort(dim=1)[:, :sample_patch_num].sort(dim=1).values
        if keep is not None:
            features = features.gather(1, keep[..., None].expand(-1, -1, features.shape[-1]))
            position_ids = position_ids.gather(1, keep)
        padding = torch.zeros(position_ids.shape, dtype=torch.bool, device=features.device)
        if patch_masks is not None:
            padding = padding | ~patch_masks.bool()[:, None]
        embeddings = self.image_proj(features) + self.type_embedding.weight[1]
        embeddings = self.dropout(self.patch_layernorm_embedding(embeddings))
        return embeddings, padding, position_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        sample_patch_num: int | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool = False,
        patch_indices: torch.Tensor | None = None,
    ) -> BiomedGPTEncoderOutput:
        batch, text_len = input_ids.shape
        text_padding = input_ids.eq(self.pad_token_id) if attention_mask is None else ~attention_mask.bool()
        text = self.embed_tokens(input_ids) + self.type_embedding.weight[0]
        text = self.dropout(self.layernorm_embedding(text))
        text_positions = self.pos_ln(self.embed_positions.weight[:text_len]).expand(batch, -1, -1)

        image_len = 0
        image_ids = None
        if patch_images is not None:
            image, image_padding, image_ids = self.embed_image(
                patch_images, patch_masks, sample_patch_num, generator, patch_indices
            )
            image_len = image.shape[1]
            x = torch.cat([image, text], dim=1)
            padding_mask = torch.cat([image_padding, text_padding], dim=1)
            positions = torch.cat([self.image_pos_ln(self.embed_image_positions(image_ids)), text_positions], dim=1)
        else:
            x, padding_mask, positions = text, text_padding, text_positions
        x = x * (~padding_mask)[..., None].to(x.dtype)

        fused = _uses_fused_attention(self.layers)
        text_buckets = self.token_rp_bucket[:text_len, :text_len]
        if fused:
            # The fused kernels take the bias as its parts and never build it [B, H, S, S].
            q_pos, k_pos = _position_projections(
                self.pos_q_linear, self.pos_k_linear, positions, positions, self.num_heads, self.pos_scaling
            )
            fused_bias = AttentionBias(q_pos=q_pos, k_pos=k_pos, key_padding=padding_mask)
        else:
            # Absolute-position bias and the key padding mask are shared by every layer.
            shared_bias = _position_bias(
                self.pos_q_linear, self.pos_k_linear, positions, positions, self.num_heads, self.pos_scaling
            )
            shared_bias = shared_bias + _negative_infinity_where(padding_mask[:, None, None, :], shared_bias.dtype)
            image_buckets = None
            if image_len:
                image_buckets = self.image_rp_bucket[image_ids[:, :, None], image_ids[:, None, :]]

        hidden_states: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            if fused:
                text = TextRelativeBias(
                    _whole_table(self.token_rel_pos_table_list[index]), text_buckets, image_len, image_len
                )
                image = None
                if image_ids is not None and image_len:
                    table = _whole_table(self.image_rel_pos_table_list[index])
                    image = ImageRelativeBias(table, image_ids, image_ids, self.grid_size)
                x = layer(x, dataclasses.replace(fused_bias, text=text, image=image))
                continue
            bias = shared_bias.clone()
            text_rel = self.token_rel_pos_table_list[index](text_buckets).permute(2, 0, 1)
            bias[:, :, image_len:, image_len:] += text_rel.to(bias.dtype)
            if image_buckets is not None:
                image_rel = self.image_rel_pos_table_list[index](image_buckets).permute(0, 3, 1, 2)
                bias[:, :, :image_len, :image_len] += image_rel.to(bias.dtype)
            x = layer(x, bias)
        x = self.layer_norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return BiomedGPTEncoderOutput(
            last_hidden_state=x,
            padding_mask=padding_mask,
            position_embeddings=positions,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class BiomedGPTDecoder(nn.Module):
    """Autoregressive decoder over text tokens or VQ image codes (``code_masks``), tied output projection."""

    def __init__(self, config: BiomedGPTConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        dim, eps, heads = config.d_model, config.layer_norm_eps, config.decoder_attention_heads
        self.num_heads = heads
        self.pad_token_id = config.pad_token_id
        self.grid_size = config.image_bucket_size
        self.pos_scaling = (dim // heads * config.attn_scale_factor) ** -0.5
        self.max_target_positions = config.max_position_embeddings
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = layer_norm(dim, eps)
        self.code_layernorm_embedding = layer_norm(dim, eps)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, dim)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, dim)
        self.pos_ln = layer_norm(dim, eps)
        self.image_pos_ln = layer_norm(dim, eps)
        self.self_pos_q_linear = nn.Linear(dim, dim)
        self.self_pos_k_linear = nn.Linear(dim, dim)
        self.cross_pos_q_linear = nn.Linear(dim, dim)
        self.cross_pos_k_linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.dropout)
        rates = torch.linspace(0, config.decoder_drop_path_rate, config.decoder_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(DecoderLayer(config, rate) for rate in rates)
        self.layer_norm = layer_norm(dim, eps)
        self.output_projection = TiedOutputProjection(dim, config.vocab_size, bias=False)
        self.output_projection.weight = embed_tokens.weight
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * config.token_bucket_size - 1, heads) for _ in range(config.decoder_layers)
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(image_relative_bucket_count(config.image_bucket_size), heads)
            for _ in range(config.decoder_layers)
        )
        self.register_buffer(
            "token_rp_bucket",
            text_relative_buckets(config.token_bucket_size, config.max_position_embeddings),
            persistent=False,
        )
        self.register_buffer("image_rp_bucket", image_relative_buckets(config.image_bucket_size), persistent=False)
        self.register_buffer(
            "image_position_idx",
            decoder_image_position_ids(config.code_grid_size, config.image_bucket_size, config.max_position_embeddings),
            persistent=False,
        )

    def _target_positions(self, steps: torch.Tensor, code_rows: torch.Tensor | None) -> torch.Tensor:
        """LayerNormed position embeddings [B or 1, T, d] of decoder steps; image positions for code rows."""
        text = self.pos_ln(self.embed_positions(steps))[None]
        if code_rows is None:
            return text
        image = self.image_pos_ln(self.embed_image_positions(self.image_position_idx[steps]))[None]
        return torch.where(code_rows[:, None, None], image, text)

    def _self_relative_bias(
        self, index: int, q_steps: torch.Tensor, k_steps: torch.Tensor, code_rows: torch.Tensor | None
    ) -> torch.Tensor:
        text = self.token_rel_pos_table_list[index](self.token_rp_bucket[q_steps[:, None], k_steps[None, :]])
        text = text.permute(2, 0, 1)[None]
        if code_rows is None:
            return text
        q_ids, k_ids = self.image_position_idx[q_steps], self.image_position_idx[k_steps]
        image = self.image_rel_pos_table_list[index](self.image_rp_bucket[q_ids[:, None], k_ids[None, :]])
        return torch.where(code_rows[:, None, None, None], image.permute(2, 0, 1)[None], text)

    def _fused_biases(
        self,
        positions: torch.Tensor,
        encoder_outputs: BiomedGPTEncoderOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        no_cache: bool,
        past_len: int,
    ) -> tuple[AttentionBias, AttentionBias]:
        """The self- and cross-attention biases of the ``triton`` backend: the same parts as the dense path."""
        total_len = positions.shape[1]
        key_padding = None
        if attention_mask is not None:
            key_padding = ~attention_mask.bool()[:, -total_len:]
        elif no_cache and bool(input_ids.eq(self.pad_token_id).any()):
            key_padding = input_ids.eq(self.pad_token_id)
        q_pos, k_pos = _position_projections(
            self.self_pos_q_linear, self.self_pos_k_linear, positions[:, past_len:], positions, self.num_heads,
            self.pos_scaling,
        )  # fmt: skip
        self_bias = AttentionBias(q_pos=q_pos, k_pos=k_pos, key_padding=key_padding, causal_offset=past_len)
        q_pos, k_pos = _position_projections(
            self.cross_pos_q_linear, self.cross_pos_k_linear, positions[:, past_len:],
            encoder_outputs.position_embeddings, self.num_heads, self.pos_scaling,
        )  # fmt: skip
        cross_bias = AttentionBias(q_pos=q_pos, k_pos=k_pos, key_padding=encoder_outputs.padding_mask)
        return self_bias, cross_bias

    def _fused_self_bias(
        self,
        base: AttentionBias,
        index: int,
        q_steps: torch.Tensor,
        k_steps: torch.Tensor,
        code_rows: torch.Tensor | None,
    ) -> AttentionBias:
        """Layer ``index``'s self-attention bias as parts: text buckets for text rows, image buckets (from the
        steps' image position ids) for image-code rows, as ``_self_relative_bias`` picks them."""
        text_rows = None if code_rows is None else ~code_rows
        text_index = self.token_rp_bucket[q_steps[:, None], k_steps[None, :]]
        text = TextRelativeBias(_whole_table(self.token_rel_pos_table_list[index]), text_index, rows=text_rows)
        image = None
        if code_rows is not None:
            batch = code_rows.shape[0]
            q_ids = self.image_position_idx[q_steps].expand(batch, -1)
            k_ids = self.image_position_idx[k_steps].expand(batch, -1)
            table = _whole_table(self.image_rel_pos_table_list[index])
            image = ImageRelativeBias(table, q_ids, k_ids, self.grid_size, rows=code_rows)
        return dataclasses.replace(base, text=text, image=image)

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_outputs: BiomedGPTEncoderOutput,
        past_key_values: DecoderCache | None = None,
        use_cache: bool = False,
        code_masks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        hidden_state_loss: HiddenStateLoss | None = None,
    ) -> tuple[Any, DecoderCache | None, tuple[torch.Tensor, ...] | None]:
        """input_ids [B,T]: the whole prefix, or only the new steps when ``past_key_values`` is given.

        Returns logits [B,T,V] (with ``hidden_state_loss``: that loss's tensors instead), the updated cache and
        optionally the hidden states.
        """
        batch, new_len = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        total_len = past_len + new_len
        if total_len > self.max_target_positions:
            raise ValueError(f"decoder length {total_len} exceeds max_position_embeddings={self.max_target_positions}")
        device = input_ids.device
        # Given code_masks (even all False), both the text and the image-code paths run and rows pick theirs:
        # under ZeRO-3 every rank must call the same modules in the same order, whatever its batch holds.
        code_rows = None if code_masks is None else code_masks.bool().to(device)
        all_steps = torch.arange(total_len, device=device)
        new_steps = all_steps[past_len:]

        positions = self._target_positions(all_steps, code_rows)
        encoder_states = encoder_outputs.last_hidden_state
        fused = _uses_fused_attention(self.layers)
        if fused:
            self_bias, cross_bias = self._fused_biases(
                positions, encoder_outputs, input_ids, attention_mask, past_key_values is None, past_len
            )
        else:
            self_bias = _position_bias(
                self.self_pos_q_linear,
                self.self_pos_k_linear,
                positions[:, past_len:],
                positions,
                self.num_heads,
                self.pos_scaling,
            )
            future = new_steps[:, None] < all_steps[None, :]
            masks = future[None, None]
            if attention_mask is not None:
                masks = masks | ~attention_mask.bool()[:, None, None, -total_len:]
            elif past_key_values is None and bool(input_ids.eq(self.pad_token_id).any()):
                masks = masks | input_ids.eq(self.pad_token_id)[:, None, None, :]
            self_bias = self_bias + _negative_infinity_where(masks, self_bias.dtype)

            cross_bias = _position_bias(
                self.cross_pos_q_linear,
                self.cross_pos_k_linear,
                positions[:, past_len:],
                encoder_outputs.position_embeddings,
                self.num_heads,
                self.pos_scaling,
            )
            cross_bias = cross_bias + _negative_infinity_where(
                encoder_outputs.padding_mask[:, None, None, :], cross_bias.dtype
            )

        x = self.embed_tokens(input_ids)
        text_x = self.layernorm_embedding(x)
        if code_rows is not None:
            text_x = torch.where(code_rows[:, None, None], self.code_layernorm_embedding(x), text_x)
        x = self.dropout(text_x)

        hidden_states: list[torch.Tensor] = []
        presents: list[LayerCache] = []
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            if fused:
                bias = self._fused_self_bias(self_bias, index, new_steps, all_steps, code_rows)
            else:
                bias = self_bias + self._self_relative_bias(index, new_steps, all_steps, code_rows).to(self_bias.dtype)
            past = None if past_key_values is None else past_key_values[index]
            x, present = layer(x, bias, encoder_states, cross_bias, past_key_value=past, use_cache=use_cache)
            if use_cache:
                presents.append(present)  # type: ignore[arg-type]
        x = self.layer_norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        # Keyword, not positional: ZeRO-3's forward pre-hooks see positional inputs only, and a callable there
        # would draw DeepSpeed's "unknown inputs type" warning.
        logits = self.output_projection(x, hidden_state_loss=hidden_state_loss)
        return logits, (tuple(presents) if use_cache else None), (tuple(hidden_states) or None)


def _full_parameters(module: nn.Module) -> contextlib.AbstractContextManager:
    """Gather a module's own ZeRO-3-partitioned parameters (built under ``deepspeed.zero.Init``) so they can be
    initialised in place; rank 0's values are then broadcast, so every rank starts from the same weights."""
    partitioned = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


class BiomedGPTPreTrainedModel(PreTrainedModel):
    config_class = BiomedGPTConfig
    base_model_prefix = "biomedgpt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r".*\.version$", r".*_rp_bucket$", r".*image_position_idx$"]

    def _init_weights(self, module: nn.Module) -> None:
        """The original's init_bert_params (Linear/Embedding ~ N(0, 0.02)), kaiming convs, unit norms."""
        with _full_parameters(module):
            self._init_module(module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.init_std
        embedding = getattr(getattr(self, "encoder", None), "embed_tokens", None)
        if isinstance(module, nn.Linear):
            if embedding is not None and module.weight is embedding.weight:
                return  # the tied output projection is the embedding, initialised as such
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm)) or (
            hasattr(module, "weight") and type(module).__name__ == "FusedLayerNorm"
        ):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, FrozenBatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.zero_()
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
        elif isinstance(module, BiomedGPTAttention) and module.c_attn is not None:
            module.c_attn.data.fill_(1.0)


class BiomedGPTForConditionalGeneration(BiomedGPTPreTrainedModel):
    """BiomedGPT: image + text in, text (or image codes, or location bins) out.

    ``forward`` takes the argument names of the transformers OFA port and returns a ``Seq2SeqLMOutput``.
    """

    _tied_weights_keys = ["decoder.embed_tokens.weight", "decoder.output_projection.weight"]

    def __init__(self, config: BiomedGPTConfig) -> None:
        super().__init__(config)
        # One matrix for encoder input, decoder input and output projection (a single Parameter).
        shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = BiomedGPTEncoder(config, shared)
        self.decoder = BiomedGPTDecoder(config, shared)
        self.post_init()

    # transformers embedding hooks (tying, resizing)
    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value
        self.decoder.output_projection.weight = value.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.output_projection

    def get_encoder(self) -> BiomedGPTEncoder:
        return self.encoder

    def get_decoder(self) -> BiomedGPTDecoder:
        return self.decoder

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention between ``sdpa``, ``reference`` and ``triton`` (same weights, same results)."""
        if backend == "triton":
            require_triton()
        self.config.attention_backend = backend
        self.config.validate()
        for module in self.modules():
            if isinstance(module, BiomedGPTAttention):
                module.backend = backend

    def set_embedding_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the shared embedding (and with it the tied output projection)."""
        self.encoder.embed_tokens.weight.requires_grad_(trainable)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        sample_patch_num: int | None = None,
        generator: torch.Generator | None = None,
        patch_indices: torch.Tensor | None = None,
    ) -> BiomedGPTEncoderOutput:
        """``patch_indices`` [B, K]: image patches to keep (row-major on the feature grid); else, with
        ``sample_patch_num``, a random subset drawn with ``generator``."""
        return self.encoder(
            input_ids,
            attention_mask,
            patch_images,
            patch_masks,
            sample_patch_num,
            generator,
            patch_indices=patch_indices,
        )

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_outputs: BiomedGPTEncoderOutput,
        past_key_values: DecoderCache | None = None,
        use_cache: bool = False,
        code_masks: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        """Logits [B,T,V] of the given decoder steps and the updated cache."""
        logits, cache, _ = self.decoder(
            decoder_input_ids, encoder_outputs, past_key_values, use_cache, code_masks, decoder_attention_mask
        )
        return logits, cache

    @staticmethod
    def reorder_encoder_outputs(encoder_outputs: BiomedGPTEncoderOutput, index: torch.Tensor) -> BiomedGPTEncoderOutput:
        """Select/repeat batch rows (beam search)."""
        return BiomedGPTEncoderOutput(
            last_hidden_state=encoder_outputs.last_hidden_state.index_select(0, index),
            padding_mask=encoder_outputs.padding_mask.index_select(0, index),
            position_embeddings=encoder_outputs.position_embeddings.index_select(0, index),
        )

    @staticmethod
    def reorder_cache(past_key_values: DecoderCache, index: torch.Tensor) -> DecoderCache:
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in past_key_values)  # type: ignore

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        *,
        num_beams: int = 5,
        max_new_tokens: int = 200,
        min_new_tokens: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        temperature: float = 1.0,
        num_return_sequences: int = 1,
        do_sample: bool = False,
    ) -> torch.Tensor:
        """transformers' ``generate`` arguments, decoded by the fairseq-semantics beam search of
        :func:`biomedgpt.model.generation.generate` (transformers' own generation knows nothing of this model's
        cache or position biases).

        Returns ``[batch * num_return_sequences, L]`` token ids that start with ``decoder_start_token_id`` and end
        with eos, right-padded with ``pad_token_id``, best first per sample, as transformers returns for
        encoder-decoder models. At most ``max_new_tokens`` tokens follow the start token (eos included); eos comes
        after at least ``min_new_tokens``. For scores, forced prefixes, answer tries or VQ-code decoding, call
        :func:`~biomedgpt.model.generation.generate` with a :class:`~biomedgpt.model.generation.DecodingConfig`.
        """
        if do_sample:
            raise ValueError("do_sample=True: this model decodes by beam search (fairseq semantics); no sampling")
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"num_return_sequences={num_return_sequences} must be between 1 and num_beams={num_beams}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (eos is a new token), got {max_new_tokens}")
        if min_new_tokens >= max_new_tokens:
            raise ValueError(
                f"min_new_tokens={min_new_tokens} must be below max_new_tokens={max_new_tokens}: the search always "
                "ends with eos, which counts as a new token"
            )
        decoding = DecodingConfig(
            beam_size=num_beams,
            max_len_a=0.0,
            max_len_b=max_new_tokens - 1,  # fairseq's max_len counts the tokens before eos
            min_len=min_new_tokens,
            len_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            temperature=temperature,
        )
        hypotheses = generate(self, input_ids, patch_images, patch_masks, attention_mask, config=decoding)
        start = self.config.decoder_start_token_id
        start = self.config.bos_token_id if start is None else start  # as the search itself starts
        rows = [[start, *h.tokens.tolist()] for sample in hypotheses for h in sample[:num_return_sequences]]
        out = torch.full((len(rows), max(map(len, rows))), self.config.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out.to(input_ids.device)

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted.masked_fill(shifted.eq(-100), self.config.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        code_masks: torch.Tensor | None = None,
        encoder_outputs: BiomedGPTEncoderOutput | None = None,
        past_key_values: DecoderCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        sample_patch_num: int | None = None,
        patch_indices: torch.Tensor | None = None,
        hidden_state_loss: HiddenStateLoss | None = None,
    ) -> Seq2SeqLMOutput | BiomedGPTHiddenStateLossOutput:
        """``labels`` [B,T] (pad or -100 ignored) give a token-mean cross entropy; training code applies its own
        label smoothing and weighting on the logits. ``patch_indices`` / ``sample_patch_num``: see ``encode``.

        ``hidden_state_loss(states, weight)``: training with a fused loss; called on the decoder's final states and
        the tied output weight inside the output projection, it replaces the logits (the result is a
        :class:`BiomedGPTHiddenStateLossOutput`; ``labels`` are not used then)."""
        output_hidden_states = bool(output_hidden_states)
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids (or precomputed encoder_outputs)")
            encoder_outputs = self.encoder(
                input_ids,
                attention_mask,
                patch_images,
                patch_masks,
                sample_patch_num,
                output_hidden_states=output_hidden_states,
                patch_indices=patch_indices,
            )
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self._shift_right(labels)
        use_cache = bool(use_cache) if use_cache is not None else False
        logits, cache, decoder_states = self.decoder(
            decoder_input_ids,
            encoder_outputs,
            past_key_values,
            use_cache,
            code_masks,
            decoder_attention_mask,
            output_hidden_states,
            hidden_state_loss,
        )
        if hidden_state_loss is not None:
            return BiomedGPTHiddenStateLossOutput(
                loss_parts=logits, encoder_last_hidden_state=encoder_outputs.last_hidden_state
            )
        loss = None
        if labels is not None:
            targets = labels.masked_fill(labels.eq(self.config.pad_token_id), -100)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=cache,
            decoder_hidden_states=decoder_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )


def count_trainable_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
