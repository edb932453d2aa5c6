"""The chunked loss over the tied output projection equals the plain loss on the full logits, without the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from biomedgpt.train.fused_loss import fused_label_smoothed_cross_entropy
from biomedgpt.train.loss import kept_token_count, label_smoothed_cross_entropy
from biomedgpt.train.memory_profile import peak_allocated_bytes

PAD = 1


def make_batch(
    dtype: torch.dtype = torch.float32, batch: int = 4, length: int = 9, dim: int = 32, vocab: int = 301, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder states, an output projection and targets with padding tails and -100 holes."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen, dtype=dtype) / math.sqrt(dim)).requires_grad_()
    target = torch.randint(2, vocab, (batch, length), generator=gen)
    target[0, length - 3 :] = PAD
    target[min(2, batch - 1), 1] = -100
    target[min(3, batch - 1), 4:6] = -100
    return hidden, weight, target


def constraint_masks_for(target: torch.Tensor, vocab: int, seed: int = 1) -> torch.Tensor:
    """Random allowed sets (about a third of the vocabulary, a different count per token) holding the target."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(*target.shape, vocab, generator=gen) < 0.3
    masks.scatter_(-1, target.clamp(min=0)[..., None], True)
    return masks


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise within ``rtol`` of each value, or of the tensor's largest magnitude for values near zero."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def run_both(hidden, weight, target, chunk_size, objective="loss", **kwargs):
    """(plain, fused) results with the gradients of ``objective`` wrt hidden and weight."""
    results = []
    for fused in (False, True):
        hidden.grad = weight.grad = None
        if fused:
            out = fused_label_smoothed_cross_entropy(hidden, weight, target, chunk_size=chunk_size, **kwargs)
        else:
            out = label_smoothed_cross_entropy(hidden @ weight.t(), target, **kwargs)
        value = out.loss if objective == "loss" else out.nll_loss
        value.backward()
        grads = (hidden.grad.clone(), None if weight.grad is None else weight.grad.clone())
        results.append((out, grads))
    return results


CASES = {
    "eps0": dict(epsilon=0.0),
    "eps0.1": dict(epsilon=0.1),
    "example_weights": dict(epsilon=0.1, example_weights=torch.tensor([2.0, 0.5, 1.0, 0.7])),
    "drop_worst": dict(epsilon=0.1, drop_worst_ratio=0.2, example_weights=torch.tensor([2.0, 1.0, 1.0, 0.5])),
    "constraint_masks": dict(epsilon=0.1, constraint_masks="random"),
    "masks_and_drop_worst": dict(epsilon=0.1, constraint_masks="random", drop_worst_ratio=0.2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    ("chunk_size", "objective"),  # 30 target tokens: chunks of 4 and 7 do not divide them, 1024 is one chunk
    [(1, "loss"), (4, "loss"), (7, "loss"), (1024, "loss"), (7, "nll_loss")],
)
def test_equals_plain_loss_and_gradients_fp32(case, chunk_size, objective):
    hidden, weight, target = make_batch()
    kwargs = dict(CASES[case], padding_idx=PAD)
    if kwargs.get("constraint_masks") == "random":
        kwargs["constraint_masks"] = constraint_masks_for(target, weight.shape[0])
    (plain, plain_grads), (fused, fused_grads) = run_both(hidden, weight, target, chunk_size, objective, **kwargs)

    tokens = int((target.ne(PAD) & target.ne(-100)).sum())
    assert tokens == 30
    assert fused.ntokens == plain.ntokens == kept_token_count(tokens, kwargs.get("drop_worst_ratio", 0.0))
    assert fused.loss.dtype == plain.loss.dtype == torch.float32
    assert_rel_close(fused.loss, plain.loss, 1e-5)
    assert_rel_close(fused.nll_loss, plain.nll_loss, 1e-5)
    assert_rel_close(fused.per_example, plain.per_example, 1e-5)
    assert torch.equal(fused.per_example_tokens, plain.per_example_tokens)
    assert fused.per_example.requires_grad is False
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        assert_rel_close(fused_grad, plain_grad, 1e-5)


def reference_token_losses(logits: torch.Tensor, target: torch.Tensor, epsilon: float, masks=None) -> torch.Tensor:
    """Per-token OFA/fairseq smoothed loss from torch's own ``F.cross_entropy``, independent of both losses.

    fairseq puts ``eps / (n - 1)`` on each of the n allowed classes on top of ``1 - eps - eps / (n - 1)`` on the
    target; torch's ``label_smoothing=s`` puts ``s / n`` on each class on top of ``1 - s``: the same when
    ``s = eps * n / (n - 1)``. With masks, each token is its own n-way problem over its allowed columns.
    """
    if masks is None:
        vocab = logits.shape[-1]
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=epsilon * vocab / (vocab - 1))
    losses = []
    for row, label, allowed in zip(logits, target, masks):
        columns = allowed.nonzero().squeeze(-1)
        n = columns.numel()
        smoothing = epsilon * n / (n - 1) if n > 1 else 0.0
        local = (columns == label).nonzero().squeeze()
        losses.append(F.cross_entropy(row[columns], local, label_smoothing=smoothing))
    return torch.stack(losses)


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_an_independent_reference_tightly(case):
    hidden, weight, target = make_batch(torch.float64)
    kwargs = dict(CASES[case], padding_idx=PAD)
    masks = None
    if kwargs.get("constraint_masks") == "random":
        masks = kwargs["constraint_masks"] = constraint_masks_for(target, weight.shape[0])
    fused = fused_label_smoothed_cross_entropy(hidden, weight, target, chunk_size=6, **kwargs)
    (fused.loss + 0.25 * fused.nll_loss).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    keep = target.ne(PAD) & target.ne(-100)
    rows = torch.arange(target.shape[0])[:, None].expand_as(target)[keep]
    logits = (hidden @ weight.t())[keep]
    weights = kwargs.get("example_weights", torch.ones(target.shape[0])).double()[rows]
    token_masks = None if masks is None else masks[keep]
    loss = weights * reference_token_losses(logits, target[keep], kwargs["epsilon"], token_masks)
    nll = weights * reference_token_losses(logits, target[keep], 0.0, token_masks)
    kept = loss.argsort()[: kept_token_count(loss.numel(), kwargs.get("drop_worst_ratio", 0.0))]
    (loss[kept].sum() + 0.25 * nll[kept].sum()).backward()

    assert fused.loss.dtype == torch.float64
    torch.testing.assert_close(fused.loss, loss[kept].sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(fused.nll_loss, nll[kept].sum(), rtol=1e-12, atol=0)
    expected_per_example = torch.zeros(target.shape[0], dtype=torch.float64).index_add_(0, rows[kept], loss[kept])
    torch.testing.assert_close(fused.per_example, expected_per_example.detach(), rtol=1e-12, atol=1e-12)
    assert fused.per_example_tokens.tolist() == torch.bincount(rows[kept], minlength=target.shape[0]).tolist()
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-10, atol=1e-13)


def test_float64_agrees_with_the_plain_loss_which_computes_in_fp32():
    hidden, weight, target = make_batch(torch.float64)
    (plain, plain_grads), (fused, fused_grads) = run_both(hidden, weight, target, 4, epsilon=0.1, padding_idx=PAD)
    assert_rel_close(fused.loss, plain.loss.double(), 1e-5)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        assert_rel_close(fused_grad, plain_grad, 1e-5)


def test_frozen_projection_weight_gets_no_gradient_and_hidden_grads_still_match():
    hidden, weight, target = make_batch()
    weight.requires_grad_(False)
    (plain, plain_grads), (fused, fused_grads) = run_both(hidden, weight, target, 5, epsilon=0.1, padding_idx=PAD)
    assert fused_grads[1] is None and weight.grad is None
    assert_rel_close(fused_grads[0], plain_grads[0], 1e-5)


def test_batch_of_padding_only_gives_zero_loss_and_zero_gradients():
    hidden, weight, target = make_batch()
    target = torch.full_like(target, PAD)
    target[1, 2] = -100
    out = fused_label_smoothed_cross_entropy(hidden, weight, target, epsilon=0.1, drop_worst_ratio=0.2)
    out.loss.backward()
    assert out.ntokens == 0 and out.loss.item() == 0.0 and out.per_example_tokens.sum().item() == 0
    assert hidden.grad.abs().sum().item() == 0.0 and weight.grad.abs().sum().item() == 0.0


def test_bf16_matches_the_plain_loss_on_bf16_logits():
    hidden, weight, target = make_batch(torch.bfloat16)
    (plain, plain_grads), (fused, fused_grads) = run_both(hidden, weight, target, 5, epsilon=0.1, padding_idx=PAD)
    assert fused.loss.dtype == torch.float32  # fp32 softmax, as the plain loss's .float()
    assert_rel_close(fused.loss, plain.loss, 1e-5)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        assert fused_grad.dtype == torch.bfloat16
        assert_rel_close(fused_grad.float(), plain_grad.float(), 2e-2)  # bf16 rounding of the gradients


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator allocated (forward and autograd backward alike); views
    and in-place results, which share an input's memory, do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            value.untyped_storage().data_ptr()
            for value in pytree.tree_leaves((args, kwargs))
            if isinstance(value, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("with_masks", [False, True])
def test_no_tensor_of_tokens_times_vocabulary_is_ever_allocated(with_masks):
    hidden, weight, target = make_batch(batch=4, length=64, dim=16, vocab=997)
    tokens, vocab = int((target.ne(PAD) & target.ne(-100)).sum()), weight.shape[0]
    masks = constraint_masks_for(target, vocab) if with_masks else None
    kwargs = dict(epsilon=0.1, padding_idx=PAD, constraint_masks=masks, drop_worst_ratio=0.2)

    with LargestTensor() as plain_probe:
        label_smoothed_cross_entropy(hidden @ weight.t(), target, **kwargs).loss.backward()
    assert plain_probe.largest >= tokens * vocab  # the probe sees the plain loss's logits (and masks)

    with LargestTensor() as fused_probe:
        fused_label_smoothed_cross_entropy(hidden, weight, target, chunk_size=32, **kwargs).loss.backward()
    # per chunk: 32 tokens' logits (or mask rows); the [V, d] weight gradient is the only other large tensor
    assert fused_probe.largest == max(32 * vocab, weight.numel())


def test_peak_memory_at_the_full_vocabulary_stays_under_half_of_one_logits_tensor():
    vocab, tokens, dim, chunk = 59_457, 1024, 64, 128
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, tokens // 8, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / 8).requires_grad_()
    target = torch.randint(2, vocab, (8, tokens // 8), generator=gen)
    weights = torch.rand(8, generator=gen) + 0.5

    def step() -> None:
        out = fused_label_smoothed_cross_entropy(
            hidden, weight, target, epsilon=0.1, example_weights=weights, drop_worst_ratio=0.2, chunk_size=chunk
        )
        out.loss.backward()

    logits_bytes = tokens * vocab * 4
    _, peak = peak_allocated_bytes(step)
    # the weight gradient (15 MB) plus a few [chunk, V] buffers (30 MB each); the plain loss's peak is several
    # fp32 [tokens, V] tensors (benchmarks/fused_loss.py measures it)
    assert weight.numel() * 4 < peak < logits_bytes / 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(hidden=torch.zeros(4, 8)), "hidden must be"),
        (dict(weight=torch.zeros(10, 7)), "weight must be the"),
        (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), "same dtype"),
        (dict(target=torch.full((2, 4), 2)), "disagree on"),
        (dict(example_weights=torch.ones(3)), "example_weights must be"),
        (dict(constraint_masks=torch.ones(2, 3, 10)), "constraint_masks must be"),
        (dict(constraint_masks=torch.ones(2, 3, 9, dtype=torch.bool)), "constraint_masks must be"),
        (dict(chunk_size=0), "chunk_size must be"),
        (dict(target=torch.tensor([[2, 3, 10], [1, 1, -100]])), "token id 10"),
        (dict(target=torch.tensor([[2, 3, -5], [1, 1, -100]])), "token id -5"),
    ],
)
def test_bad_inputs_are_refused_with_the_argument_named(change, message):
    args = dict(hidden=torch.zeros(2, 3, 8), weight=torch.zeros(10, 8), target=torch.full((2, 3), 2))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_label_smoothed_cross_entropy(**args)


def test_fp32_gradients_at_the_full_vocabulary_are_closer_to_float64_than_the_plain_losss():
    """torch's CPU log_softmax backward sums each row's incoming gradient in fp32 with a relative error of ~3e-5 at
    59,457 columns (torch.sum does it to ~5e-8), and the smoothing term sends an equal gradient to every column; the
    fused backward uses n * g for that sum, so its fp32 gradients are closer to a float64 reference, not just equal
    to the plain ones within their error (the benchmark's grad_hidden difference is mostly the plain loss's)."""
    vocab, batch, length, dim = 59_457, 4, 32, 64
    gen = torch.Generator().manual_seed(3)
    hidden64 = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    weight64 = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / 8
    target = torch.randint(2, vocab, (batch, length), generator=gen)
    weights = torch.rand(batch, generator=gen) + 0.5

    def grads(loss_of, dtype):
        hidden = hidden64.to(dtype).detach().requires_grad_()
        weight = weight64.to(dtype).detach().requires_grad_()
        loss_of(hidden, weight).backward()
        return hidden.grad.double(), weight.grad.double()

    def reference(hidden, weight):
        token_weights = weights.double()[:, None].expand(batch, length).flatten()
        logits = (hidden @ weight.t()).flatten(0, 1)
        return (token_weights * reference_token_losses(logits, target.flatten(), 0.1)).sum()

    expected = grads(reference, torch.float64)
    plain = grads(lambda h, w: label_smoothed_cross_entropy(h @ w.t(), target, 0.1, -1, weights).loss, torch.float32)
    fused = grads(
        lambda h, w: fused_label_smoothed_cross_entropy(h, w, target, 0.1, -1, weights, chunk_size=48).loss,
        torch.float32,
    )
    for fused_grad, plain_grad, true_grad in zip(fused, plain, expected):
        fused_error = float((fused_grad - true_grad).norm() / true_grad.norm())
        plain_error = float((plain_grad - true_grad).norm() / true_grad.norm())
        assert fused_error < 1e-6 and fused_error <= plain_error
