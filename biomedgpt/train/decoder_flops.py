"""Matmul FLOPs of a forward pass of a decoder-only Hugging Face causal LM (Llama 2/3, Mistral, Qwen2, GPT-2
families), from its config and the batch shape: the MFU of the causal-LM recipe.

As for BiomedGPT (biomedgpt/train/flops.py), torch's FlopCounterMode cannot run inside a ZeRO-3 engine, so a formula
stands in, checked against FlopCounterMode on plain models (eager attention: on CPU the counter does not see the
fused SDPA kernel). Counted, at 2 FLOPs per multiply-add: the attention projections (grouped-query K/V at their own
width), the attention scores and their weighted sum over the whole ``seq_len x seq_len`` square (what the kernels
compute, causal mask or not), the MLP (three matmuls when gated, two otherwise) and the output projection over the
vocabulary. Not counted: norms, activations, rotary embeddings, softmax (under 0.01% at these shapes).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GATED_MLP_FAMILIES", "PLAIN_MLP_FAMILIES", "decoder_forward_flops"]

GATED_MLP_FAMILIES = frozenset({"llama", "mistral", "qwen2"})
PLAIN_MLP_FAMILIES = frozenset({"gpt2"})


def decoder_forward_flops(config: Any, batch: int, seq_len: int) -> int:
    """Forward FLOPs of ``batch`` sequences of ``seq_len`` tokens (padding included: the kernels compute it)."""
    family = getattr(config, "model_type", None)
    if family not in GATED_MLP_FAMILIES | PLAIN_MLP_FAMILIES:
        known = ", ".join(sorted(GATED_MLP_FAMILIES | PLAIN_MLP_FAMILIES))
        raise ValueError(f"no FLOP formula for model_type {family!r} (known: {known})")
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    mlp_matmuls = 3 if family in GATED_MLP_FAMILIES else 2
    per_token_layer = 2 * hidden * (heads * head_dim) * 2  # query and output projections
    per_token_layer += 2 * hidden * (kv_heads * head_dim) * 2  # key and value projections
    per_token_layer += 2 * hidden * int(ffn) * mlp_matmuls
    tokens = batch * seq_len
    attention_per_layer = 2 * 2 * batch * heads * seq_len * seq_len * head_dim  # scores and weighted values
    layers = int(config.num_hidden_layers)
    output = 2 * hidden * int(config.vocab_size) * tokens
    return layers * (per_token_layer * tokens + attention_per_layer) + output
