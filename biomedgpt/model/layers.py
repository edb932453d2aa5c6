"""Pre-LN Transformer layers with the NormFormer extra LayerNorms, drop-path and LayerNorm choice.

The original: BiomedGPT models/ofa/unify_transformer_layer.py (TransformerEncoderLayer, TransformerDecoderLayer).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from biomedgpt.kernels.bias import AttentionBias
from biomedgpt.model.attention import BiomedGPTAttention, KeyValue


@functools.lru_cache(maxsize=1)
def apex_fused_layer_norm() -> type[nn.Module] | None:
    """NVIDIA apex's FusedLayerNorm when apex is installed with its CUDA extension, else None.

    Checked at run time: apex is optional, and the PyPI package called ``apex`` is an unrelated web library.
    """
    if not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore[import-not-found]
    except Exception:  # ImportError, or the unrelated PyPI "apex" failing to import its own deps
        return None
    return FusedLayerNorm


_apex_layer_norm_allowed = True


@contextlib.contextmanager
def apex_layer_norm_allowed(allowed: bool) -> Iterator[None]:
    """Models built inside this block use apex's FusedLayerNorm (when present) only if ``allowed``; training's
    ``model.apex_layer_norm`` switch. Same parameters and values either way, so checkpoints do not care."""
    global _apex_layer_norm_allowed
    previous, _apex_layer_norm_allowed = _apex_layer_norm_allowed, allowed
    try:
        yield
    finally:
        _apex_layer_norm_allowed = previous


def layer_norm(dim: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm whose parameters are named ``weight``/``bias`` whichever implementation runs."""
    fused = apex_fused_layer_norm() if _apex_layer_norm_allowed else None
    return fused(dim, eps=eps) if fused is not None else nn.LayerNorm(dim, eps=eps)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples (one draw per sample)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    # The original computes the erf GELU in fp32 whatever the activation dtype.
    return F.gelu(x.float()).type_as(x)


class _PreNormLayer(nn.Module):
    """Parts shared by encoder and decoder layers: self-attention block and the FFN block."""

    def __init__(self, config, heads: int, ffn_dim: int, drop_path_rate: float) -> None:  # noqa: ANN001
        super().__init__()
        dim, eps, normformer = config.d_model, config.layer_norm_eps, config.normformer
        self.self_attn = self.make_attention(config, heads)
        self.self_attn_layer_norm = layer_norm(dim, eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_layernorm = layer_norm(ffn_dim, eps) if normformer else None
        self.final_layer_norm = layer_norm(dim, eps)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    @staticmethod
    def make_attention(config, heads: int) -> BiomedGPTAttention:  # noqa: ANN001
        return BiomedGPTAttention(
            config.d_model,
            heads,
            config.attention_dropout,
            config.attn_scale_factor,
            scale_heads=config.normformer,
            backend=config.attention_backend,
        )

    def feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation_dropout(exact_gelu(self.fc1(self.final_layer_norm(x))))
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        return x + self.drop_path(self.dropout(self.fc2(h)))


class EncoderLayer(_PreNormLayer):
    def __init__(self, config, drop_path_rate: float) -> None:  # noqa: ANN001 - BiomedGPTConfig
        super().__init__(config, config.encoder_attention_heads, config.encoder_ffn_dim, drop_path_rate)
        self.attn_ln = layer_norm(config.d_model, config.layer_norm_eps) if config.normformer else None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | AttentionBias) -> torch.Tensor:
        h, _ = self.self_attn(self.self_attn_layer_norm(x), attn_bias=attn_bias)
        if self.attn_ln is not None:
            h = self.attn_ln(h)
        x = x + self.drop_path(self.dropout(h))
        return self.feed_forward_block(x)


class DecoderLayer(_PreNormLayer):
    """Self-attention, cross-attention and FFN blocks, each pre-LN with a NormFormer LN after it."""

    def __init__(self, config, drop_path_rate: float) -> None:  # noqa: ANN001 - BiomedGPTConfig
        heads = config.decoder_attention_heads
        super().__init__(config, heads, config.decoder_ffn_dim, drop_path_rate)
        dim, eps, normformer = config.d_model, config.layer_norm_eps, config.normformer
        self.self_attn_ln = layer_norm(dim, eps) if normformer else None
        self.encoder_attn = self.make_attention(config, heads)
        self.encoder_attn_layer_norm = layer_norm(dim, eps)
        self.cross_attn_ln = layer_norm(dim, eps) if normformer else None

    def forward(
        self,
        x: torch.Tensor,
        self_attn_bias: torch.Tensor | AttentionBias,
        encoder_hidden_states: torch.Tensor,
        cross_attn_bias: torch.Tensor | AttentionBias,
        past_key_value: tuple[torch.Tensor, ...] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        self_past: KeyValue | None = None if past_key_value is None else past_key_value[:2]  # type: ignore
        cross_past: KeyValue | None = None if past_key_value is None else past_key_value[2:]  # type: ignore
        h, self_present = self.self_attn(
            self.self_attn_layer_norm(x), attn_bias=self_attn_bias, past_key_value=self_past, use_cache=use_cache
        )
        if self.self_attn_ln is not None:
            h = self.self_attn_ln(h)
        x = x + self.drop_path(self.dropout(h))

        h, cross_present = self.encoder_attn(
            self.encoder_attn_layer_norm(x),
            key_value_states=encoder_hidden_states,
            attn_bias=cross_attn_bias,
            past_key_value=cross_past,
            use_cache=use_cache,
        )
        if self.cross_attn_ln is not None:
            h = self.cross_attn_ln(h)
        x = x + self.drop_path(self.dropout(h))
        x = self.feed_forward_block(x)
        present = self_present + cross_present if use_cache else None  # type: ignore[operator]
        return x, present
