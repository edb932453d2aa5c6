"""The attention bias of one BiomedGPT attention call, described by its sources instead of a dense tensor.

The ``reference`` and ``sdpa`` backends add a dense [B, H, Tq, Tk] bias built from these same parts; the ``triton``
backend reads the parts inside its kernel. This module needs only torch, so the model imports it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextRelativeBias:
    """1-D relative-position bias ``table[index[i - q_start, j - k_start], h]`` on a block of the logits.

    table: [R, H] one layer's bucket table (a differentiable tensor: it receives the gradient).
    index: [Tq_text, Tk_text] integer bucket of each (query, key) in the block, shared by the batch.
    rows: optional [B] bool, the samples that use this bias (the decoder's text rows); None means all.
    """

    table: torch.Tensor
    index: torch.Tensor
    q_start: int = 0
    k_start: int = 0
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class ImageRelativeBias:
    """2-D relative-position bias of image patches on the leading [Tq_image, Tk_image] block of the logits.

    table: [(2G-1)^2 + 3, H] one layer's bucket table; q_ids / k_ids: [B, Tq_image] / [B, Tk_image] position ids
    (row * G + col + 1, 0 reserved; per sample, so sampled patches keep their own); grid_size: G.
    rows: optional [B] bool, the samples that use this bias (the decoder's image-code rows); None means all.
    """

    table: torch.Tensor
    q_ids: torch.Tensor
    k_ids: torch.Tensor
    grid_size: int
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionBias:
    """Everything the logits of one attention add to ``scale * q.k``.

    q_pos / k_pos: [B or 1, H, Tq, d] / [B or 1, H, Tk, d] the absolute-position projections, q_pos already
    multiplied by its scale, so that the bias is ``q_pos @ k_pos^T``; None for no absolute bias.
    key_padding: [B, Tk] bool, True where a key is padding (masked with -inf).
    causal_offset: None for no causal mask, else query i is step ``i + causal_offset`` and sees keys j <= that step
    (the decoder's past length when a KV cache is used).
    """

    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    causal_offset: int | None = None
    text: TextRelativeBias | None = None
    image: ImageRelativeBias | None = None
