"""The fused loss wired into training: through the model's output projection (where ZeRO-3 gathers the tied
weight) it gives the plain loss's values and gradients. The real 2-rank ZeRO-3 job is in test_memory_runs.py."""

from __future__ import annotations

import functools

import pytest
import torch
from model_configs import TEST_VOCAB, small_test_config

from biomedgpt import BiomedGPTForConditionalGeneration
from biomedgpt.config_utils import load_config
from biomedgpt.train.config import TrainConfig, preset_paths
from biomedgpt.train.fused_loss import fused_loss_parts, loss_output_from_parts
from biomedgpt.train.loss import label_smoothed_cross_entropy

PAD = 1


def model_batch(seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of a small padded image+text batch, its targets, example weights and constraint masks."""
    gen = torch.Generator().manual_seed(seed)
    batch, text_len, target_len = 3, 7, 6
    ids = torch.randint(4, 100, (batch, text_len), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 5:] = PAD
    decoder_ids = torch.randint(4, 100, (batch, target_len), generator=gen)
    decoder_ids[:, 0] = 0
    target = torch.randint(4, 100, (batch, target_len), generator=gen)
    target[2, 4:] = PAD
    inputs = dict(
        input_ids=ids,
        patch_images=torch.randn(batch, 3, 64, 64, generator=gen),
        patch_masks=torch.tensor([True, False, True]),
        decoder_input_ids=decoder_ids,
    )
    weights = torch.tensor([1.0, 2.0, 0.5])
    masks = torch.rand(batch, target_len, TEST_VOCAB, generator=gen) < 0.2
    masks.scatter_(-1, target[..., None], True)
    return inputs, target, weights, masks


@pytest.mark.parametrize("constrained", [False, True], ids=["plain", "trie-constrained"])
def test_the_models_fused_loss_equals_the_plain_loss_on_its_logits(constrained: bool) -> None:
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(small_test_config(ffn_dim=128, dropout=0.1)).train()
    inputs, target, weights, masks = model_batch()
    loss_args = dict(
        epsilon=0.1, padding_idx=PAD, example_weights=weights, constraint_masks=masks if constrained else None,
        drop_worst_ratio=0.2,
    )  # fmt: skip
    results = []
    for fused in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both forwards
        if fused:
            loss = functools.partial(fused_loss_parts, target=target, chunk_size=5, **loss_args)
            output = model(**inputs, hidden_state_loss=loss)
            assert not hasattr(output, "logits") or output.get("logits") is None
            out = loss_output_from_parts(output.loss_parts)
        else:
            out = label_smoothed_cross_entropy(model(**inputs).logits, target, **loss_args)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused.ntokens == plain.ntokens and fused.ntokens > 0
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.nll_loss, plain.nll_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.per_example, plain.per_example, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.per_example_tokens, plain.per_example_tokens)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        # Relative to the gradient's norm: the ResNet's BatchNorm layers amplify fp32 rounding (a different but
        # equally exact summation order of the loss) in single small elements of the first convolutions.
        # encoder.pos_k_linear.bias has a gradient of exactly 0 in exact arithmetic (a key bias shifts every score of
        # a query equally): only rounding is left there, hence the absolute floor.
        difference, norm = float((fused_grads[name] - grad).norm()), float(grad.norm())
        assert difference <= 1e-4 * norm + 1e-6, (name, difference, norm)
    assert plain_grads["encoder.embed_tokens.weight"].abs().sum() > 0  # the tied weight gets its gradient


def demo(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, "demo", list(overrides), presets=preset_paths())


def test_fused_loss_settings_are_validated_and_named_in_the_config() -> None:
    from biomedgpt.config_utils import ConfigError, config_to_dict

    resolved = config_to_dict(demo("optim.fused_loss=true", "optim.fused_loss_chunk_size=256"))
    assert resolved["optim"]["fused_loss"] is True and resolved["optim"]["fused_loss_chunk_size"] == 256
    assert config_to_dict(demo())["optim"]["fused_loss"] is False
    with pytest.raises((ValueError, ConfigError), match="fused_loss_chunk_size=0 must be a positive"):
        demo("optim.fused_loss_chunk_size=0")
