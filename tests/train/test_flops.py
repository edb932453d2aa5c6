import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.train.flops import forward_flops


@pytest.mark.parametrize("with_image", [True, False])
def test_formula_matches_torch_flop_counter(with_image):
    config = BiomedGPTConfig.for_size(
        "tiny",
        vocab_size=9300,
        d_model=64,
        encoder_ffn_dim=96,
        decoder_ffn_dim=128,
        encoder_layers=2,
        decoder_layers=3,
    )
    model = BiomedGPTForConditionalGeneration(config)
    batch, text_len, target_len = 2, 9, 6
    inputs = dict(
        input_ids=torch.randint(4, 100, (batch, text_len)),
        decoder_input_ids=torch.randint(4, 100, (batch, target_len)),
        code_masks=torch.zeros(batch, dtype=torch.bool),
    )
    if with_image:
        inputs.update(patch_images=torch.randn(batch, 3, 64, 48), patch_indices=torch.tensor([[0, 3, 5]] * batch))
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    expected = forward_flops(
        config, batch, text_len, target_len, (64, 48) if with_image else None, 3 if with_image else None
    )
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)
