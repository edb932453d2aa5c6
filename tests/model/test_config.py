import pytest
import torch

from biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model import MODEL_SIZES, PUBLISHED_PARAMETER_COUNTS, count_trainable_parameters


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_parameter_count_matches_published_size(size):
    # Built on the meta device: the large sizes must not need their memory up front.
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.for_size(size))
    count = count_trainable_parameters(model)
    published = PUBLISHED_PARAMETER_COUNTS[size]
    print(f"{size}: {count:,} trainable parameters (published {published:,})")
    assert count == published  # exact: one missing bias or LayerNorm would be off by its size
    assert model.decoder.output_projection.weight is model.encoder.embed_tokens.weight


def test_size_presets_follow_the_spec_table():
    xlarge = BiomedGPTConfig.for_size("xlarge")
    assert (xlarge.encoder_layers, xlarge.decoder_layers, xlarge.d_model) == (24, 12, 1280)
    assert xlarge.d_model // xlarge.encoder_attention_heads == 80
    assert BiomedGPTConfig.for_size("base").resnet_layers == (3, 4, 23)
    assert BiomedGPTConfig.for_size("tiny", dropout=0.0).dropout == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=250), "divisible"),
        (dict(resnet_type="resnet18"), "resnet_type"),
        (dict(vocab_size=5000), "vocab_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(attention_backend="flash"), "attention_backend"),
    ],
)
def test_invalid_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiomedGPTConfig(**kwargs)


def test_unknown_size_lists_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        BiomedGPTConfig.for_size("huge")
