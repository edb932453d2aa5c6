"""The ``triton`` attention backend is optional: without triton the model imports and runs on the other backends,
and choosing ``triton`` fails with an error that says what to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_configs import small_test_config

from biomedgpt import BiomedGPTForConditionalGeneration

TESTS = Path(__file__).resolve().parents[1]

# Runs with triton made unimportable (a None entry in sys.modules makes `import triton` raise ImportError).
WITHOUT_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None
    import torch
    from model_configs import small_test_config
    from biomedgpt import BiomedGPTForConditionalGeneration

    model = BiomedGPTForConditionalGeneration(small_test_config(d_model=32, heads=2, ffn_dim=64)).eval()
    ids = torch.tensor([[0, 5, 6, 2]])
    assert torch.isfinite(model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits).all()
    for make in (
        lambda: model.set_attention_backend("triton"),
        lambda: BiomedGPTForConditionalGeneration(small_test_config(d_model=32, heads=2, attention_backend="triton")),
    ):
        try:
            make()
        except RuntimeError as error:
            print("REFUSED:", error)
        else:
            raise SystemExit("the triton backend was accepted without triton")
    assert model.config.attention_backend == "sdpa", model.config.attention_backend
    """
)


def test_without_triton_the_model_runs_and_the_triton_backend_is_refused_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    refusals = [line for line in result.stdout.splitlines() if line.startswith("REFUSED:")]
    assert len(refusals) == 2, result.stdout
    for line in refusals:
        assert "pip install triton" in line and "'sdpa'" in line, line


def test_a_fused_bias_on_a_dense_backend_is_refused() -> None:
    from biomedgpt.kernels import AttentionBias

    model = BiomedGPTForConditionalGeneration(small_test_config(d_model=32, heads=2, ffn_dim=64))
    attention = model.encoder.layers[0].self_attn
    with pytest.raises(TypeError, match="set_attention_backend"):
        attention(torch.zeros(1, 3, 32), attn_bias=AttentionBias())
