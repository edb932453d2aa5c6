# ruff: noqa: E402 - the imports follow the module-level skip
"""The fused attention kernels against the reference attention with the dense bias, under Triton's interpreter.

The dense bias is built here from the model's own bucket tables (biomedgpt.model.positions), not from the
kernel's in-kernel bucket arithmetic, so a wrong bucket, mask or scale shows as a mismatch. Lengths are chosen
not to be multiples of the 16-wide blocks the interpreter uses.

Run by test_kernels_under_interpreter.py in a fresh process, or directly:
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels/check_fused_attention.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    # Triton decorates its own library functions in interpreter mode only if the variable is set before triton is
    # first imported, which the main test process cannot promise (torch imports triton early).
    pytest.skip("needs TRITON_INTERPRET=1 from process start", allow_module_level=True)
pytest.importorskip("triton")

import torch

from biomedgpt.kernels import AttentionBias, ImageRelativeBias, TextRelativeBias, fused_attention
from biomedgpt.kernels.attention import dropout_keep_mask
from biomedgpt.model.attention import reference_attention
from biomedgpt.model.positions import (
    decoder_image_position_ids,
    image_relative_bucket_count,
    image_relative_buckets,
    text_relative_buckets,
)

GRID = 42  # the config's image_bucket_size
TOKEN_BUCKETS = 256
SCALE = (16 * 2.0) ** -0.5


def leaf(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).requires_grad_(True)


def dense_bias(bias: AttentionBias, batch: int, heads: int, tq: int, tk: int) -> torch.Tensor:
    """The [B, H, Tq, Tk] bias the model's dense path would add, from the same parts."""
    dense = torch.zeros(batch, heads, tq, tk)
    if bias.q_pos is not None:
        dense = dense + bias.q_pos @ bias.k_pos.transpose(-1, -2)
    dense = dense.clone()
    if bias.text is not None:
        text = bias.text
        rows = torch.ones(batch, dtype=torch.bool) if text.rows is None else text.rows
        block = text.table[text.index].permute(2, 0, 1)[None]
        q0, k0 = text.q_start, text.k_start
        q1, k1 = q0 + text.index.shape[0], k0 + text.index.shape[1]
        dense[:, :, q0:q1, k0:k1] += torch.where(rows[:, None, None, None], block, torch.zeros_like(block))
    if bias.image is not None:
        image = bias.image
        rows = torch.ones(batch, dtype=torch.bool) if image.rows is None else image.rows
        buckets = image_relative_buckets(image.grid_size)[image.q_ids[:, :, None], image.k_ids[:, None, :]]
        block = image.table[buckets].permute(0, 3, 1, 2)
        tq_i, tk_i = image.q_ids.shape[1], image.k_ids.shape[1]
        dense[:, :, :tq_i, :tk_i] += torch.where(rows[:, None, None, None], block, torch.zeros_like(block))
    masked = torch.zeros(batch, 1, tq, tk, dtype=torch.bool)
    if bias.key_padding is not None:
        masked = masked | bias.key_padding[:, None, None, :]
    if bias.causal_offset is not None:
        steps = torch.arange(tq)[:, None] + bias.causal_offset
        masked = masked | (torch.arange(tk)[None, :] > steps)
    return dense.masked_fill(masked, float("-inf"))


def bias_leaves(bias: AttentionBias) -> list[torch.Tensor]:
    parts = [bias.q_pos, bias.k_pos]
    parts += [bias.text.table] if bias.text is not None else []
    parts += [bias.image.table] if bias.image is not None else []
    return [p for p in parts if p is not None]


def assert_matches_reference(q, k, v, bias: AttentionBias, gen: torch.Generator) -> None:  # noqa: ANN001
    batch, heads, tq, _ = q.shape
    tk = k.shape[2]
    inputs = [q, k, v, *bias_leaves(bias)]
    grad_out = torch.randn(batch, heads, tq, v.shape[-1], generator=gen)

    fused = fused_attention(q, k, v, bias, SCALE)
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)
    expected = reference_attention(q, k, v, dense_bias(bias, batch, heads, tq, tk), SCALE, 0.0)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)

    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    names = ["q", "k", "v", "q_pos", "k_pos", "text table", "image table"]
    for name, got, want in zip(names, fused_grads, expected_grads):
        assert want.abs().sum() > 0, name  # every input takes part, so a dropped gradient cannot pass as zero
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad of {n}: {m}")


def encoder_case(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBias]:
    """Self-attention over [sampled image patches ; text] with per-sample patch ids, a sample without an image
    (its patches are padding) and right-padded text."""
    batch, heads, patches, text_len, dim = 2, 2, 11, 10, 16
    length = patches + text_len  # 21: two blocks, the second partial
    # Each sample keeps its own random 11 of the 16x16 grid's patches, as pretraining's patch sampling does.
    cells = torch.stack([torch.randperm(16 * 16, generator=gen)[:patches].sort().values for _ in range(batch)])
    image_ids = (cells // 16) * GRID + cells % 16 + 1
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, :patches] = True  # sample 1 has no image
    padding[1, -3:] = True  # and shorter text
    bias = AttentionBias(
        q_pos=leaf(batch, heads, length, dim, gen=gen) * SCALE,
        k_pos=leaf(batch, heads, length, dim, gen=gen),
        key_padding=padding,
        text=TextRelativeBias(
            leaf(2 * TOKEN_BUCKETS - 1, heads, gen=gen),
            text_relative_buckets(TOKEN_BUCKETS, 1024)[:text_len, :text_len],
            q_start=patches,
            k_start=patches,
        ),
        image=ImageRelativeBias(leaf(image_relative_bucket_count(GRID), heads, gen=gen), image_ids, image_ids, GRID),
    )
    q, k, v = (leaf(batch, heads, length, dim, gen=gen) for _ in range(3))
    return q, k, v, bias


def test_encoder_image_patches_and_text_with_padding_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, bias = encoder_case(gen)
    assert_matches_reference(q, k, v, bias, gen)


def test_fp16_inputs_match_the_fp32_reference_to_fp16_precision() -> None:
    """The half-precision paths (casts before tl.dot, fp16 outputs, fp16 table gradients) on the encoder case.
    The interpreter is exact in fp16 but not in bf16, which only a GPU run can check."""
    gen = torch.Generator().manual_seed(0)
    q32, k32, v32, bias32 = encoder_case(gen)
    half = {id(t): t.detach().half().requires_grad_(True) for t in (q32, k32, v32, *bias_leaves(bias32))}
    q, k, v = half[id(q32)], half[id(k32)], half[id(v32)]
    bias = AttentionBias(
        q_pos=half[id(bias32.q_pos)],
        k_pos=half[id(bias32.k_pos)],
        key_padding=bias32.key_padding,
        text=dataclasses.replace(bias32.text, table=half[id(bias32.text.table)]),
        image=dataclasses.replace(bias32.image, table=half[id(bias32.image.table)]),
    )
    inputs = [q, k, v, *bias_leaves(bias)]
    grad_out = torch.randn(q.shape, generator=gen)
    fused = fused_attention(q, k, v, bias, SCALE)
    assert fused.dtype == torch.float16
    fused_grads = torch.autograd.grad(fused, inputs, grad_out.half())

    exact = [t.detach().float().requires_grad_(True) for t in inputs]
    bias_exact = AttentionBias(
        q_pos=exact[3],
        k_pos=exact[4],
        key_padding=bias.key_padding,
        text=dataclasses.replace(bias.text, table=exact[5]),
        image=dataclasses.replace(bias.image, table=exact[6]),
    )
    shape = (*q.shape[:3], k.shape[2])
    expected = reference_attention(exact[0], exact[1], exact[2], dense_bias(bias_exact, *shape), SCALE, 0.0)
    expected_grads = torch.autograd.grad(expected, exact, grad_out)
    torch.testing.assert_close(fused.float(), expected, atol=5e-3, rtol=5e-3)
    for got, want in zip(fused_grads, expected_grads):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, atol=5e-3, rtol=5e-3)


def test_decoder_self_attention_with_cache_and_image_code_rows_matches_reference() -> None:
    """New steps 12..16 over a cache of 12: causal with an offset, key padding, one text row and one image-code
    row (image buckets from the decoder's step position ids, step 0 having the reserved id 0)."""
    gen = torch.Generator().manual_seed(1)
    batch, heads, past, new, dim = 2, 2, 12, 5, 16
    total = past + new
    steps = torch.arange(total)
    code_rows = torch.tensor([False, True])
    ids = decoder_image_position_ids(16, GRID, 1024)
    padding = torch.zeros(batch, total, dtype=torch.bool)
    padding[0, 3] = True
    bias = AttentionBias(
        q_pos=leaf(1, heads, new, dim, gen=gen),  # shared by the batch, as text-only decoder positions are
        k_pos=leaf(1, heads, total, dim, gen=gen),
        key_padding=padding,
        causal_offset=past,
        text=TextRelativeBias(
            leaf(2 * TOKEN_BUCKETS - 1, heads, gen=gen),
            text_relative_buckets(TOKEN_BUCKETS, 1024)[steps[past:, None], steps[None, :]],
            rows=~code_rows,
        ),
        image=ImageRelativeBias(
            leaf(image_relative_bucket_count(GRID), heads, gen=gen),
            ids[steps[past:]].expand(batch, -1),
            ids[steps].expand(batch, -1),
            GRID,
            rows=code_rows,
        ),
    )
    q = leaf(batch, heads, new, dim, gen=gen)
    k, v = leaf(batch, heads, total, dim, gen=gen), leaf(batch, heads, total, dim, gen=gen)
    assert_matches_reference(q, k, v, bias, gen)


def test_causal_self_attention_without_cache_matches_reference() -> None:
    """A full 19-step causal decoder pass: two query blocks, the second partial, over two key blocks."""
    gen = torch.Generator().manual_seed(2)
    batch, heads, length, dim = 1, 2, 19, 16
    steps = torch.arange(length)
    bias = AttentionBias(
        q_pos=leaf(1, heads, length, dim, gen=gen),
        k_pos=leaf(1, heads, length, dim, gen=gen),
        causal_offset=0,
        text=TextRelativeBias(
            leaf(2 * TOKEN_BUCKETS - 1, heads, gen=gen),
            text_relative_buckets(TOKEN_BUCKETS, 1024)[steps[:, None], steps[None, :]],
        ),
    )
    q, k, v = (leaf(batch, heads, length, dim, gen=gen) for _ in range(3))
    assert_matches_reference(q, k, v, bias, gen)


def test_cross_attention_with_encoder_padding_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    batch, heads, tq, tk, dim = 2, 2, 7, 21, 16
    padding = torch.zeros(batch, tk, dtype=torch.bool)
    padding[0, :11] = True
    padding[1, -4:] = True
    bias = AttentionBias(
        q_pos=leaf(1, heads, tq, dim, gen=gen), k_pos=leaf(batch, heads, tk, dim, gen=gen), key_padding=padding
    )
    q = leaf(batch, heads, tq, dim, gen=gen)
    k, v = leaf(batch, heads, tk, dim, gen=gen), leaf(batch, heads, tk, dim, gen=gen)
    assert_matches_reference(q, k, v, bias, gen)


def dropout_case(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBias]:
    batch, heads, length, dim = 2, 2, 18, 16
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, -5:] = True
    bias = AttentionBias(
        q_pos=leaf(1, heads, length, dim, gen=gen), k_pos=leaf(1, heads, length, dim, gen=gen), key_padding=padding
    )
    q, k, v = (leaf(batch, heads, length, dim, gen=gen) for _ in range(3))
    return q, k, v, bias


def test_dropout_equals_reference_under_the_kernels_own_mask() -> None:
    """Values and gradients with dropout equal the reference that applies the keep mask the kernel draws."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, bias = dropout_case(gen)
    batch, heads, length, _ = q.shape
    p, seed = 0.3, 1234
    inputs = [q, k, v, bias.q_pos, bias.k_pos]
    grad_out = torch.randn(q.shape, generator=gen)

    fused = fused_attention(q, k, v, bias, SCALE, dropout_p=p, seed=seed)
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)

    keep = dropout_keep_mask(batch, heads, length, length, seed, p, q.device)
    logits = (q * SCALE) @ k.transpose(-1, -2) + dense_bias(bias, batch, heads, length, length)
    probs = torch.softmax(logits, dim=-1) * keep / (1 - p)
    expected = probs @ v
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)

    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dropout_mask_statistics_and_seeding() -> None:
    """The kept fraction is 1-p within 5 binomial standard deviations, heads draw different masks, and the
    default seed follows torch.manual_seed."""
    batch, heads, length, p = 2, 2, 40, 0.25
    keep = dropout_keep_mask(batch, heads, length, length, 99, p, torch.device("cpu"))
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep, dropout_keep_mask(batch, heads, length, length, 100, p, torch.device("cpu")))

    gen = torch.Generator().manual_seed(5)
    q, k, v, bias = dropout_case(gen)
    runs = []
    for torch_seed in (7, 7, 8):
        torch.manual_seed(torch_seed)
        runs.append(fused_attention(q, k, v, bias, SCALE, dropout_p=0.5).detach())
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_bad_bias_parts_are_rejected_with_the_field_named() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = (leaf(1, 2, 5, 16, gen=gen) for _ in range(3))
    with pytest.raises(ValueError, match="key_padding has shape"):
        fused_attention(q, k, v, AttentionBias(key_padding=torch.zeros(1, 4, dtype=torch.bool)), SCALE)
    text = TextRelativeBias(torch.zeros(511, 2), torch.zeros(6, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="text.index has shape"):
        fused_attention(q, k, v, AttentionBias(text=text), SCALE)
    with pytest.raises(ValueError, match="q_pos and k_pos"):
        fused_attention(q, k, v, AttentionBias(q_pos=torch.zeros(1, 2, 5, 16)), SCALE)


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.zeros(1, 1, 3, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_attention(q, q, q, AttentionBias(), SCALE)
