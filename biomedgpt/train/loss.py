"""Label-smoothed cross entropy with per-example weights and answer constraints.

The original: the ``adjust_label_smoothed_cross_entropy`` criterion of BiomedGPT
criterions/label_smoothed_cross_entropy.py (AdjustLabelSmoothedCrossEntropyCriterion, label_smoothed_nll_loss).

The original multiplies the log-probabilities of each example by its confidence (VQA answer confidence, 2.0 for
text/image/detection pretraining examples) and spreads the smoothing mass over the whole vocabulary, or, when a
constraint mask is given (trie-constrained VQA / classification training), over the allowed tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    """Summed losses and the number of target tokens they cover (normalise by ``ntokens``)."""

    loss: torch.Tensor
    nll_loss: torch.Tensor
    ntokens: int
    per_example: torch.Tensor  # [B] summed loss of each example (for per-task metrics), detached
    per_example_tokens: torch.Tensor  # [B] target tokens of each example the loss covers (after dropping)

    @property
    def mean(self) -> torch.Tensor:
        return self.loss / max(self.ntokens, 1)


def kept_token_count(num_tokens: int, drop_worst_ratio: float) -> int:
    """Target tokens left in the loss when the worst ``drop_worst_ratio`` of ``num_tokens`` are dropped."""
    if drop_worst_ratio <= 0.0:
        return num_tokens
    return int(num_tokens * (1.0 - drop_worst_ratio))


def label_smoothed_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float = 0.0,
    padding_idx: int = 1,
    example_weights: torch.Tensor | None = None,
    constraint_masks: torch.Tensor | None = None,
    drop_worst_ratio: float = 0.0,
) -> LossOutput:
    """logits [B,T,V]; target [B,T] (``padding_idx`` or -100 ignored); example_weights [B];
    constraint_masks [B,T,V] bool (True = allowed). Returns sums over the non-pad target tokens.

    Per token: (1 - eps - eps_i) * nll + eps_i * sum_v(-log p_v), eps_i = eps / (n_allowed - 1).
    With ``drop_worst_ratio`` only the :func:`kept_token_count` lowest token losses of the batch are kept (the
    original drops the hardest tokens of noisy captions late in fine-tuning); ``ntokens`` counts the kept ones.
    """
    if logits.shape[:2] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on [B, T]")
    if constraint_masks is not None:
        logits = logits.masked_fill(~constraint_masks, float("-inf"))
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    if example_weights is not None:
        lprobs = lprobs * example_weights.to(lprobs.dtype)[:, None, None]

    keep = target.ne(padding_idx) & target.ne(-100)
    example_of_token = torch.arange(target.shape[0], device=target.device)[:, None].expand_as(target)[keep]
    lprobs, safe_target = lprobs[keep], target[keep]
    nll = -lprobs.gather(-1, safe_target[:, None]).squeeze(-1)
    if constraint_masks is not None:
        allowed = constraint_masks[keep]
        smooth = -lprobs.masked_fill(~allowed, 0.0).sum(-1)
        num_allowed = allowed.sum(-1).to(lprobs.dtype)
    else:
        smooth = -lprobs.sum(-1)
        num_allowed = torch.full_like(nll, logits.shape[-1])
    eps_i = epsilon / (num_allowed - 1).clamp(min=1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    kept = kept_token_count(loss.shape[0], drop_worst_ratio)
    if kept < loss.shape[0]:
        loss, indices = torch.topk(loss, kept, largest=False, sorted=False)
        nll, example_of_token = nll[indices], example_of_token[indices]
    return summed_loss_output(loss, nll, example_of_token, target.shape[0])


def summed_loss_output(loss: torch.Tensor, nll: torch.Tensor, example_of_token: torch.Tensor, batch: int) -> LossOutput:
    """The :class:`LossOutput` of the kept tokens' losses ``loss`` and ``nll`` [N], ``example_of_token`` [N] saying
    which of the ``batch`` examples each token belongs to (shared by the plain and the fused loss)."""
    per_example = torch.zeros(batch, dtype=loss.dtype, device=loss.device).index_add_(
        0, example_of_token, loss.detach()
    )
    per_example_tokens = torch.zeros(batch, dtype=torch.long, device=loss.device).index_add_(
        0, example_of_token, torch.ones_like(example_of_token)
    )
    return LossOutput(
        loss=loss.sum(),
        nll_loss=nll.sum(),
        ntokens=int(loss.shape[0]),
        per_example=per_example,
        per_example_tokens=per_example_tokens,
    )
