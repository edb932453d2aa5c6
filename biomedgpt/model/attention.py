"""Multi-head attention with a dense additive bias on every call (BiomedGPT models/ofa/unify_multihead_attention.py).

OFA adds learned absolute- and relative-position biases to the logits of every attention, so there is no
bias-free fast path. Three implementations compute the same thing:
- ``reference``: explicit logits, fp32 softmax, as the original;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the bias as a float ``attn_mask``
  (the bias is learned, so its gradient must flow through the mask; tests check it does);
- ``triton``: fused Triton kernels (``biomedgpt.kernels.attention``) that take the bias as its parts, an
  ``AttentionBias`` (position projections, bucket tables and indices, masks), and never build it densely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomedgpt.kernels.attention import fused_attention, require_triton
from biomedgpt.kernels.bias import AttentionBias

KeyValue = tuple[torch.Tensor, torch.Tensor]


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """[B,H,Tq,hd] x [B,H,Tk,hd] -> [B,H,Tq,hd] with logits (q*scale)@k^T + bias, softmax in fp32."""
    logits = torch.matmul(query * scale, key.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits.float(), dim=-1).type_as(value)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    mask = None if bias is None else bias.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def triton_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AttentionBias,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    return fused_attention(query, key, value, bias, scale, dropout_p)


ATTENTION_FUNCTIONS = {"reference": reference_attention, "sdpa": sdpa_attention, "triton": triton_attention}


class BiomedGPTAttention(nn.Module):
    """Self- or cross-attention; ``c_attn`` scales each head's output before ``out_proj`` (NormFormer)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        scale_factor: float = 2.0,
        scale_heads: bool = True,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        # The original scales q by (head_dim * factor) ** -0.5 with factor 2 (attn_scale_factor).
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.dropout = dropout
        if backend == "triton":
            require_triton()
        self.backend = backend
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attn_bias: torch.Tensor | AttentionBias | None = None,
        past_key_value: KeyValue | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KeyValue | None]:
        """hidden_states [B,Tq,C]; key_value_states [B,Tk,C] for cross-attention; attn_bias broadcastable to
        [B,H,Tq,Tk] (masks folded in as -inf), or for the ``triton`` backend an ``AttentionBias``.
        Self-attention appends to ``past_key_value``; cross-attention reuses it as the encoder's projected keys
        and values."""
        if attn_bias is None and self.backend == "triton":
            attn_bias = AttentionBias()
        if attn_bias is not None and isinstance(attn_bias, AttentionBias) != (self.backend == "triton"):
            raise TypeError(
                f"attention backend {self.backend!r} got a {type(attn_bias).__name__} bias: the 'triton' backend "
                "takes an AttentionBias, the others a dense tensor; switch backends with set_attention_backend so "
                "that the encoder and decoder build the matching bias"
            )
        query = self._split_heads(self.q_proj(hidden_states))
        if key_value_states is None:
            key = self._split_heads(self.k_proj(hidden_states))
            value = self._split_heads(self.v_proj(hidden_states))
            if past_key_value is not None:
                key = torch.cat([past_key_value[0], key], dim=2)
                value = torch.cat([past_key_value[1], value], dim=2)
        elif past_key_value is not None:
            key, value = past_key_value
        else:
            key = self._split_heads(self.k_proj(key_value_states))
            value = self._split_heads(self.v_proj(key_value_states))
        present = (key, value) if use_cache else None

        dropout_p = self.dropout if self.training else 0.0
        out = ATTENTION_FUNCTIONS[self.backend](query, key, value, attn_bias, self.scaling, dropout_p)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1).to(out.dtype)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(out), present
