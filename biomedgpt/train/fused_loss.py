"""Label-smoothed cross entropy fused with the tied output projection, chunked over target tokens.

``label_smoothed_cross_entropy`` takes logits [B,T,V]; with BiomedGPT's 59,457-token vocabulary the fp32 logits of a
batch (and the log-probabilities, weighted copies and gradients autograd keeps next to them) are several times the
size of everything else the loss touches. :func:`fused_label_smoothed_cross_entropy` takes the decoder's final hidden
states and the output projection weight instead and computes the same :class:`LossOutput` without ever holding
logits for more than ``chunk_size`` target tokens at a time.

How: a ``torch.autograd.Function`` computes, chunk by chunk, each target token's unweighted negative log-likelihood
and smoothing sum, keeping only the per-token log-sum-exp; its backward recomputes each chunk's logits from the saved
hidden states and weight (the recompute idea of "Cut Your Losses in Large-Vocabulary Language Models", Wijmans et al.
2024, and Liger-Kernel's fused linear cross entropy, done here in plain torch). Everything after the per-token values
(example weights, the smoothing mix, drop-worst, the sums) is ordinary autograd on [tokens]-sized tensors, written
exactly as in ``label_smoothed_cross_entropy``, so the semantics cannot drift apart: a token that drop-worst removes
gets a zero gradient from ``torch.topk``'s backward and its chunk rows are not recomputed at all.

Cost: four vocabulary-sized matmuls per step (forward, recompute, grad wrt hidden, grad wrt weight) instead of the
plain loss's three; the gain is memory (``benchmarks/fused_loss.py``, docs/benchmarks.md).

Why not liger-kernel's ``LigerFusedLinearCrossEntropyFunction``: it computes the gradients inside its forward and
only scales them by a scalar ``grad_output`` afterwards, so per-example weights (the VQA answer confidence, the 2.0
of the v2 examples), drop-worst (the kept set is known only once every token's loss is) and per-token constraint
masks cannot be expressed with it; its smoothing spreads ``eps / V`` over every class, while the OFA/fairseq loss
spreads ``eps / (n - 1)`` over the allowed ones; and it needs Triton (on this CPU only the slow interpreter). A torch
version runs on every device and both torch versions the project supports.

Constraint masks (trie-constrained VQA / classification batches) are applied per chunk: each chunk's mask rows are
read from the [B,T,V] mask, so no fallback to the plain loss is needed and none happens.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from biomedgpt.train.loss import LossOutput, kept_token_count, summed_loss_output

DEFAULT_CHUNK_SIZE = 1024  # 1,024 x 59,457 fp32 logits = 232 MiB per chunk buffer


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """Logits of some target tokens, in ``compute_dtype`` and with disallowed tokens at -inf (as the plain loss's
    ``masked_fill`` before ``log_softmax``)."""
    logits = torch.mm(hidden, weight.t()).to(compute_dtype)
    if masks is not None:
        logits.masked_fill_(~masks, float("-inf"))
    return logits


class _ChunkedTokenLosses(torch.autograd.Function):
    """Per-token ``-log p(target)`` and ``-sum_allowed log p`` of ``hidden @ weight.T``, ``chunk_size`` rows at a
    time; backward recomputes the chunks' logits."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,  # [N, d] rows of the target tokens
        weight: torch.Tensor,  # [V, d]
        target: torch.Tensor,  # [N]
        masks: torch.Tensor | None,  # [B*T, V] bool, or None
        rows: torch.Tensor,  # [N] row of each token in ``masks``
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        num_tokens = hidden.shape[0]
        nll = torch.empty(num_tokens, dtype=compute_dtype, device=hidden.device)
        smooth = torch.empty_like(nll)
        lse = torch.empty_like(nll)
        num_allowed = torch.full_like(nll, weight.shape[0])
        for start in range(0, num_tokens, chunk_size):
            part = slice(start, start + chunk_size)
            chunk_masks = None if masks is None else masks[rows[part]]
            lprobs = _chunk_logits(hidden[part], weight, chunk_masks, compute_dtype)
            lse[part] = torch.logsumexp(lprobs, dim=-1)
            lprobs.sub_(lse[part, None])  # now log_softmax, in place: one [chunk, V] buffer besides logsumexp's
            nll[part] = -lprobs.gather(-1, target[part, None]).squeeze(-1)
            if chunk_masks is not None:
                smooth[part] = -lprobs.masked_fill_(~chunk_masks, 0.0).sum(-1)
                num_allowed[part] = chunk_masks.sum(-1).to(compute_dtype)
            else:
                smooth[part] = -lprobs.sum(-1)
        ctx.save_for_backward(hidden, weight, target, masks, rows, lse, num_allowed)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(num_allowed)
        return nll, smooth, num_allowed

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_nll: torch.Tensor | None, grad_smooth: torch.Tensor | None, _grad_allowed: object
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        hidden, weight, target, masks, rows, lse, num_allowed = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_nll = torch.zeros_like(lse) if grad_nll is None else grad_nll
        grad_smooth = torch.zeros_like(lse) if grad_smooth is None else grad_smooth
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # fp32 accumulation of the weight gradient across chunks, also for bf16/fp16 weights
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        # Tokens whose losses got no gradient (dropped by drop-worst) contribute nothing: skip their recompute.
        active = (grad_nll.ne(0) | grad_smooth.ne(0)).nonzero().squeeze(-1)
        for start in range(0, active.shape[0], ctx.chunk_size):
            index = active[start : start + ctx.chunk_size]
            chunk_masks = None if masks is None else masks[rows[index]]
            chunk_hidden = hidden[index]
            probs = _chunk_logits(chunk_hidden, weight, chunk_masks, lse.dtype)
            probs.sub_(lse[index, None]).exp_()
            g_nll, g_smooth = grad_nll[index], grad_smooth[index]
            # d nll / dz = p - onehot(y);  d smooth / dz = n p - 1_allowed  (z: logits, p: softmax over allowed).
            # n * g_smooth is one rounding where log_softmax's backward sums V equal values in fp32 (~3e-5 off).
            grad_logits = probs.mul_((g_nll + num_allowed[index] * g_smooth)[:, None])
            grad_logits.sub_(g_smooth[:, None])
            if chunk_masks is not None:
                grad_logits.masked_fill_(~chunk_masks, 0.0)
            grad_logits.scatter_add_(-1, target[index, None], -g_nll[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, index, torch.mm(grad_logits, weight))
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(lse.dtype), chunk_hidden.to(lse.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    example_weights: torch.Tensor | None,
    constraint_masks: torch.Tensor | None,
    chunk_size: int,
) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, d] decoder states, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be the [V, d] output projection with d = {hidden.shape[2]} (hidden's last dimension), "
            f"got shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.shape[:2] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree on [B, T]")
    if example_weights is not None and example_weights.shape != target.shape[:1]:
        raise ValueError(f"example_weights must be [B] = [{target.shape[0]}], got shape {tuple(example_weights.shape)}")
    if constraint_masks is not None:
        expected = (*target.shape, weight.shape[0])
        if tuple(constraint_masks.shape) != expected or constraint_masks.dtype != torch.bool:
            raise ValueError(
                f"constraint_masks must be a bool tensor of shape [B, T, V] = {list(expected)}, "
                f"got {constraint_masks.dtype} {tuple(constraint_masks.shape)}"
            )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of target tokens, got {chunk_size!r}")


def fused_label_smoothed_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    epsilon: float = 0.0,
    padding_idx: int = 1,
    example_weights: torch.Tensor | None = None,
    constraint_masks: torch.Tensor | None = None,
    drop_worst_ratio: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LossOutput:
    """``label_smoothed_cross_entropy(hidden @ weight.T, target, ...)`` without the [B,T,V] logits.

    hidden [B,T,d] (the decoder's final, layer-normed states); weight [V,d] (the tied output projection); the other
    arguments and the result are those of :func:`biomedgpt.train.loss.label_smoothed_cross_entropy`. Logits exist
    for at most ``chunk_size`` target tokens at a time (padding and -100 positions are never projected).
    Computed in fp32 for fp32/bf16/fp16 inputs, as the plain loss does after ``.float()``; float64 inputs stay
    float64 (the plain loss casts them to fp32).
    """
    _check_inputs(hidden, weight, target, example_weights, constraint_masks, chunk_size)
    batch, length, dim = hidden.shape
    vocab = weight.shape[0]
    keep = target.ne(padding_idx) & target.ne(-100)
    rows = keep.flatten().nonzero().squeeze(-1)  # row-major, the token order of the plain loss
    example_of_token = torch.div(rows, length, rounding_mode="floor")
    safe_target = target.flatten()[rows]
    if safe_target.numel():
        low, high = (int(v) for v in torch.aminmax(safe_target))
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"target holds token id {bad}, outside the vocabulary of the output projection (0..{vocab - 1}); "
                f"only padding_idx={padding_idx} and -100 are ignored"
            )
    masks = None if constraint_masks is None else constraint_masks.reshape(batch * length, vocab)
    nll, smooth, num_allowed = _ChunkedTokenLosses.apply(
        hidden.reshape(batch * length, dim).index_select(0, rows), weight, safe_target, masks, rows, chunk_size
    )
    # From here on the plain loss's arithmetic, on [tokens] instead of [tokens, V] (weights applied to the
    # log-probabilities there are applied to their per-token sums here).
    if example_weights is not None:
        token_weights = example_weights.to(nll.dtype)[example_of_token]
        nll, smooth = nll * token_weights, smooth * token_weights
    eps_i = epsilon / (num_allowed - 1).clamp(min=1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    kept = kept_token_count(loss.shape[0], drop_worst_ratio)
    if kept < loss.shape[0]:
        loss, indices = torch.topk(loss, kept, largest=False, sorted=False)
        nll, example_of_token = nll[indices], example_of_token[indices]
    return summed_loss_output(loss, nll, example_of_token, batch)


def fused_loss_parts(hidden: torch.Tensor, weight: torch.Tensor, **loss_args: object) -> tuple[torch.Tensor, ...]:
    """:func:`fused_label_smoothed_cross_entropy` as tensors only (loss, nll_loss, per_example, per_example_tokens):
    the form a model's ``hidden_state_loss`` returns through the output projection, where ZeRO-3's hooks must see
    every output (``functools.partial(fused_loss_parts, target=..., ...)`` is such a loss)."""
    out = fused_label_smoothed_cross_entropy(hidden, weight, **loss_args)  # type: ignore[arg-type]
    return out.loss, out.nll_loss, out.per_example, out.per_example_tokens


def loss_output_from_parts(parts: tuple[torch.Tensor, ...]) -> LossOutput:
    """The :class:`LossOutput` of :func:`fused_loss_parts`' tensors."""
    loss, nll_loss, per_example, per_example_tokens = parts
    return LossOutput(
        loss=loss,
        nll_loss=nll_loss,
        ntokens=int(per_example_tokens.sum()),
        per_example=per_example,
        per_example_tokens=per_example_tokens,
    )
