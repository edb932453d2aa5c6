# ruff: noqa: E402 - the imports follow the module-level skip
"""The whole model on the ``triton`` attention backend against ``reference``, under Triton's interpreter.

Run by test_kernels_under_interpreter.py in a fresh process, or directly:
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels/check_fused_model.py``.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    # See check_fused_attention.py: the variable must be set before triton is first imported.
    pytest.skip("needs TRITON_INTERPRET=1 from process start", allow_module_level=True)
pytest.importorskip("triton")

import torch
from model_configs import small_test_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from biomedgpt import BiomedGPTForConditionalGeneration

BATCH, HEADS, TEXT_LEN, PATCHES, TARGET_LEN = 2, 2, 10, 11, 6
SOURCE_LEN = PATCHES + TEXT_LEN  # 21: not a multiple of the 16-wide blocks


class TensorSizes(TorchDispatchMode):
    """Records the element count of every floating-point tensor any torch operation returns (forward and
    backward). Integer and byte tensors are left out: Triton's interpreter copies each argument's storage as
    bytes, which would count index tensors in bytes, not elements; a bias or probability tensor is a float."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.numels.update(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())
        return out


# Sizes of the [B, H, Tq, Tk] logits of the encoder self-, decoder self- and cross-attention.
LOGIT_SIZES = {
    "encoder self-attention": BATCH * HEADS * SOURCE_LEN * SOURCE_LEN,
    "decoder self-attention": BATCH * HEADS * TARGET_LEN * TARGET_LEN,
    "cross-attention": BATCH * HEADS * TARGET_LEN * SOURCE_LEN,
}


def make_model() -> BiomedGPTForConditionalGeneration:
    torch.manual_seed(0)
    # d_model 32 over 2 heads: head_dim 16, the smallest tl.dot accepts; 2 layers, so per-layer tables differ.
    model = BiomedGPTForConditionalGeneration(small_test_config(d_model=32, layers=2, heads=HEADS, ffn_dim=64))
    with torch.no_grad():
        # Trained-looking relative tables and c_attn (they start at N(0, 0.02) and 1): a wrong lookup shows.
        for name, param in model.named_parameters():
            if "rel_pos_table" in name:
                param.normal_(0.0, 1.0)
            elif name.endswith("c_attn"):
                param.uniform_(0.5, 1.5)
    return model


def make_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (BATCH, TEXT_LEN), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 6], ids[1, 7:] = 2, 1  # right-padded text
    decoder_ids = torch.randint(4, 100, (BATCH, TARGET_LEN), generator=gen)
    decoder_ids[:, 0] = 0
    return dict(
        input_ids=ids,
        patch_images=torch.randn(BATCH, 3, 64, 64, generator=gen),  # a 4x4 patch grid
        patch_masks=torch.tensor([True, False]),  # sample 1 has no image: its patches are padding
        decoder_input_ids=decoder_ids,
        labels=torch.randint(4, 100, (BATCH, TARGET_LEN), generator=gen),
        code_masks=torch.tensor([False, True]),  # row 1 decodes image codes (image position biases)
    )


def run(model: BiomedGPTForConditionalGeneration, backend: str) -> tuple[torch.Tensor, dict, set[int]]:
    model.set_attention_backend(backend)
    model.zero_grad()
    sizes = TensorSizes()
    with sizes:
        # The same 11 of 16 patches drawn for both backends: the encoder samples with this generator.
        out = model(**make_batch(), sample_patch_num=PATCHES)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, sizes.numels


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[torch.Tensor, dict, set[int]]]:
    model = make_model()
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)  # the patch sampling draws from the default generator
        results[backend] = run(model, backend)
    return results


def test_tiny_model_logits_and_every_parameter_gradient_equal_reference(runs) -> None:  # noqa: ANN001
    ref_logits, ref_grads, _ = runs["reference"]
    logits, grads, _ = runs["triton"]
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # The biases' sources all learn through the kernels (tables by atomics, projections through q'/k').
    for name in (
        "encoder.token_rel_pos_table_list.1.weight",
        "encoder.image_rel_pos_table_list.0.weight",
        "encoder.pos_q_linear.weight",
        "encoder.embed_image_positions.weight",
        "decoder.self_pos_k_linear.weight",
        "decoder.cross_pos_q_linear.weight",
        "decoder.token_rel_pos_table_list.1.weight",
        "decoder.image_rel_pos_table_list.0.weight",
        "decoder.layers.0.encoder_attn.c_attn",
    ):
        assert grads[name].abs().sum() > 0, name


def test_fused_path_allocates_no_batch_heads_q_k_tensor(runs) -> None:  # noqa: ANN001
    """No torch operation of the triton run, forward or backward, returns a tensor of B*H*Tq*Tk elements; the
    reference run does, for each of the three attentions (so the recording sees them when they exist)."""
    *_, ref_sizes = runs["reference"]
    *_, sizes = runs["triton"]
    for what, numel in LOGIT_SIZES.items():
        assert numel in ref_sizes, what
        assert numel not in sizes, what


def test_cached_decoding_equals_the_reference_full_pass() -> None:
    """Step-by-step decoding with the KV cache on the triton backend gives the reference backend's logits."""
    model = make_model().eval()
    batch = make_batch()
    model.set_attention_backend("reference")
    with torch.no_grad():
        full = model(batch["input_ids"], patch_images=batch["patch_images"], patch_masks=batch["patch_masks"],
                     decoder_input_ids=batch["decoder_input_ids"]).logits  # fmt: skip
        model.set_attention_backend("triton")
        encoded = model.encode(batch["input_ids"], patch_images=batch["patch_images"], patch_masks=batch["patch_masks"])
        cache, steps = None, []
        for t in range(TARGET_LEN):
            logits, cache = model.decode(batch["decoder_input_ids"][:, t : t + 1], encoded, cache, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_a_dense_bias_on_the_triton_backend_is_refused() -> None:
    attention = make_model().encoder.layers[0].self_attn
    attention.backend = "triton"
    x = torch.zeros(1, 3, 32)
    with pytest.raises(TypeError, match="AttentionBias"):
        attention(x, attn_bias=torch.zeros(1, 2, 3, 3))
