"""The decoder-only FLOP formula of the causal-LM recipe against torch's FlopCounterMode on tiny models of each
supported family (eager attention, so the counter sees the attention matmuls)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from biomedgpt.train.decoder_flops import decoder_forward_flops


def tiny_model(family: str):
    import transformers

    common = dict(vocab_size=300, attn_implementation="eager")
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, **common))
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[family]  # fmt: skip
    config = config_class(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, **common)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_formula_matches_torch_flop_counter(family: str) -> None:
    model = tiny_model(family).eval()
    batch, seq_len = 2, 24
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 300, (batch, seq_len)))
    assert decoder_forward_flops(model.config, batch, seq_len) == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_unknown_family_is_named() -> None:
    from transformers import BertConfig

    with pytest.raises(ValueError, match="no FLOP formula for model_type 'bert'"):
        decoder_forward_flops(BertConfig(), 1, 8)
