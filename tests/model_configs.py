"""Small BiomedGPT configurations for tests that need a real model but not a published size. Importable as
``model_configs`` (pytest puts tests/ on sys.path for its conftest; scripts launched from tests get it through
``PYTHONPATH``, see ``training_jobs.torchrun_script``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedgpt import BiomedGPTConfig

# The smallest vocabulary the config accepts: 4 specials + a few text tokens + <mask> + 8192 codes + 1000 bins.
TEST_VOCAB = 9300


def small_test_config(
    d_model: int = 64, layers: int = 2, heads: int = 4, ffn_dim: int | None = None, **overrides: Any
) -> BiomedGPTConfig:
    """The tiny preset shrunk to ``d_model``/``layers``/``heads``, without dropout or drop-path (deterministic)."""
    settings: dict[str, Any] = dict(
        vocab_size=TEST_VOCAB,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        dropout=0.0,
        encoder_drop_path_rate=0.0,
        decoder_drop_path_rate=0.0,
    )
    if ffn_dim is not None:
        settings.update(encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim)
    settings.update(overrides)
    return BiomedGPTConfig.for_size("tiny", **settings)


def save_small_model(out: Path, d_model: int, heads: int) -> Path:
    """A one-layer model of width ``d_model`` with the bundled tokenizer, saved to ``out`` (seeded: same weights)."""
    import torch

    from biomedgpt import BiomedGPTForConditionalGeneration, BiomedGPTTokenizer

    torch.manual_seed(0)
    tokenizer = BiomedGPTTokenizer.default()
    config = small_test_config(d_model, layers=1, heads=heads, ffn_dim=2 * d_model, vocab_size=len(tokenizer))
    BiomedGPTForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
