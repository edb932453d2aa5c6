"""Fused kernels. Importing this package needs only torch; the Triton kernels load on first use."""

from biomedgpt.kernels.attention import fused_attention, require_triton, triton_available
from biomedgpt.kernels.bias import AttentionBias, ImageRelativeBias, TextRelativeBias

__all__ = [
    "AttentionBias",
    "ImageRelativeBias",
    "TextRelativeBias",
    "fused_attention",
    "require_triton",
    "triton_available",
]
