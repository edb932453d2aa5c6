"""Decoding for BiomedGPT: beam search / greedy with fairseq ``SequenceGenerator`` semantics, answer tries and
all-candidate scoring (BiomedGPT models/sequence_generator.py, utils/trie.py, and the all-candidate ``valid_step``
of tasks/mm_tasks/vqa_gen.py and tasks/cv_tasks/image_classify.py).

Semantics kept from the original evaluation code:
- beam search keeps ``2 * beam_size`` candidates per step; a candidate ending in eos is finalised only when it is
  among the top ``beam_size``; a sample stops once ``beam_size`` hypotheses are finalised or ``max_len`` is hit;
- ``max_len = max_len_a * src_len + max_len_b`` with ``src_len`` the (padded) text width of ``input_ids``;
  eos is the only choice at step ``max_len`` and is forbidden before step ``min_len``;
- with ``normalize_scores`` a hypothesis scores ``sum(log p) / len ** len_penalty`` (len counts eos), otherwise the
  plain sum (``--unnormalized``);
- trie constraints mask the logits to -inf *before* log-softmax, so the allowed tokens renormalise;
- forced prefix tokens (the question for VQA ``prompt_type=prev_output``) count in lengths and scores, and the
  trie applies to what follows the prefix, looked up as ``[bos] + tokens after the prefix``.

Deliberate differences, all about corner cases the original handles by asserting or by returning garbage:
- forced prefix steps put -inf on every other token in every beam (the original uses ``min - 1`` without a trie,
  which lets lower beams carry a wrong prefix); min_len, n-gram blocking and code masks never touch forced steps;
- hypotheses whose score is -inf are never returned, and a sample with no finite live hypothesis stops early; so a
  sample can come back with fewer than ``beam_size`` hypotheses (e.g. a trie with fewer answers than beams,
  where the original fails an assertion at ``max_len``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from biomedgpt.trie import Trie

if TYPE_CHECKING:  # the model calls this module (its ``generate``); these names are only annotations here
    from biomedgpt.model.modeling import BiomedGPTEncoderOutput, BiomedGPTForConditionalGeneration

__all__ = [
    "DecodingConfig",
    "Hypothesis",
    "Trie",
    "generate",
    "score_candidates",
]


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class DecodingConfig:
    """Decoding settings; the defaults are fairseq's (``--beam 5 --max-len-b 200 --min-len 1 --lenpen 1``).

    beam_size: 1 gives greedy decoding.
    max_len_a, max_len_b: at most ``int(a * src_len + b)`` tokens before eos (forced prefix included), clamped to
        the decoder's position table.
    min_len: eos is forbidden while fewer than ``min_len`` tokens (prefix included) were produced.
    normalize_scores: divide by ``len ** len_penalty`` (False = fairseq ``--unnormalized``).
    unk_penalty: subtracted from the unk log-prob.
    temperature: logits are divided by it before masking and log-softmax.
    no_repeat_ngram_size: forbid any n-gram (over ``[bos] + tokens``) from occurring twice; 0 disables.
    constraint_trie: restrict the tokens after the prefix to a :class:`Trie` of answers.
    allowed_token_range: ``(start, end)``: after the prefix only specials (< 4) and ids in [start, end) are
        allowed (the original's ``constraint_range``, e.g. the VQ-code block for image generation).
    gen_code: decode VQ image codes: decoder runs with ``code_masks`` and specials (incl. eos) are forbidden
        before ``max_len`` (so code sequences always have length ``max_len``).
    """

    beam_size: int = 5
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    normalize_scores: bool = True
    len_penalty: float = 1.0
    unk_penalty: float = 0.0
    temperature: float = 1.0
    no_repeat_ngram_size: int = 0
    constraint_trie: Trie | None = field(default=None, repr=False)
    allowed_token_range: tuple[int, int] | None = None
    gen_code: bool = False

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("beam_size", "max_len_b", "min_len", "no_repeat_ngram_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an int, got {value!r}")
        require(self.beam_size >= 1, f"beam_size must be >= 1 (1 = greedy), got {self.beam_size}")
        require(self.max_len_a >= 0, f"max_len_a must be >= 0, got {self.max_len_a}")
        require(self.max_len_b >= 0, f"max_len_b must be >= 0, got {self.max_len_b}")
        require(self.min_len >= 0, f"min_len must be >= 0, got {self.min_len}")
        require(self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        require(math.isfinite(self.len_penalty), f"len_penalty must be finite, got {self.len_penalty}")
        require(math.isfinite(self.unk_penalty), f"unk_penalty must be finite, got {self.unk_penalty}")
        require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature}",
        )
        require(
            self.constraint_trie is None or isinstance(self.constraint_trie, Trie),
            f"constraint_trie must be a Trie, got {type(self.constraint_trie).__name__}",
        )
        if self.allowed_token_range is not None:
            require(self.constraint_trie is None, "use either constraint_trie or allowed_token_range, not both")
            start, end = self.allowed_token_range
            require(4 <= start < end, f"allowed_token_range must satisfy 4 <= start < end, got {(start, end)}")

    def max_length(self, src_len: int, max_positions: int) -> int:
        """Most tokens before eos for a source of ``src_len`` text tokens."""
        # The decoder sees bos + max_len tokens at the last step, so max_len < max_positions.
        return min(int(self.max_len_a * src_len + self.max_len_b), max_positions - 1)


@dataclass
class Hypothesis:
    """One finished hypothesis.

    tokens: LongTensor [L] (CPU) without bos, ending with eos; it **includes** the forced prefix, whose length is
        ``prefix_len`` (as fairseq; the answer is ``tokens[prefix_len:]``).
    score: normalised or summed log-prob (see :class:`DecodingConfig`), prefix tokens included.
    positional_scores: FloatTensor [L] per-token scores whose sum is the unnormalised score: log-probs after
        temperature and trie/range renormalisation, minus ``unk_penalty`` on unk (as fairseq).
    """

    tokens: torch.Tensor
    score: float
    positional_scores: torch.Tensor
    prefix_len: int = 0

    @property
    def generated_tokens(self) -> list[int]:
        """The tokens after the forced prefix, without the final eos."""
        return self.tokens[self.prefix_len : len(self.tokens) - 1].tolist()


# ----------------------------------------------------------------------------------------------------- helpers


def _special_ids(model: BiomedGPTForConditionalGeneration) -> tuple[int, int, int, int]:
    config = model.config
    bos = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
    unk = getattr(config, "unk_token_id", None)
    return int(bos), int(config.pad_token_id), int(config.eos_token_id), 3 if unk is None else int(unk)


def _prefix_lists(
    prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None, batch: int, pad: int, eos: int
) -> list[list[int]]:
    """Per-sample forced prefixes as lists; a tensor is right-padded with ``pad`` (fairseq's layout)."""
    if prefix_tokens is None:
        return [[] for _ in range(batch)]
    if isinstance(prefix_tokens, torch.Tensor):
        if prefix_tokens.dim() != 2:
            raise ValueError(f"prefix_tokens must be [B, P], got shape {tuple(prefix_tokens.shape)}")
        rows = []
        for row in prefix_tokens.tolist():
            length = sum(1 for token in row if token != pad)
            if any(token == pad for token in row[:length]):
                raise ValueError("prefix_tokens must be right-padded (pad only after the prefix)")
            rows.append(row[:length])
    else:
        rows = [[int(token) for token in row] for row in prefix_tokens]
    if len(rows) != batch:
        raise ValueError(f"prefix_tokens has {len(rows)} rows for a batch of {batch}")
    for row in rows:
        if eos in row or pad in row:
            raise ValueError("prefix_tokens may not contain eos or pad (except as right padding of a tensor)")
    return rows


def _encode(
    model: BiomedGPTForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    patch_images: torch.Tensor | None,
    patch_masks: torch.Tensor | None,
) -> BiomedGPTEncoderOutput:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if patch_images is not None and patch_images.shape[0] != input_ids.shape[0]:
        raise ValueError(f"patch_images has {patch_images.shape[0]} rows for {input_ids.shape[0]} input rows")
    return model.encode(input_ids, attention_mask=attention_mask, patch_images=patch_images, patch_masks=patch_masks)


class _EvalMode:
    """Eval mode and no autograd for the duration of a decoding call; restores the caller's training flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.was_training = model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


def _nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    # Not Tensor.nan_to_num: it would also turn the -inf of masked tokens into the most negative float.
    return x.masked_fill(x.isnan(), float("-inf"))


def _banned_ngram_tokens(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``history``."""
    if len(history) < n:
        return []
    suffix = tuple(history[len(history) - n + 1 :])
    return [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == suffix]


# ----------------------------------------------------------------------------------------------------- generate


def generate(
    model: BiomedGPTForConditionalGeneration,
    input_ids: torch.Tensor,
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    config: DecodingConfig | None = None,
    prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Beam search (greedy for ``beam_size=1``) with incremental decoding; one best-first list per sample.

    ``prefix_tokens``: per-sample tokens forced right after bos (a right-padded [B, P] tensor or lists). They are
    part of the returned tokens; ``Hypothesis.prefix_len`` says how many.
    """
    config = config or DecodingConfig()
    with _EvalMode(model):
        return _beam_search(model, input_ids, patch_images, patch_masks, attention_mask, config, prefix_tokens)


def _beam_search(
    model: BiomedGPTForConditionalGeneration,
    input_ids: torch.Tensor,
    patch_images: torch.Tensor | None,
    patch_masks: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    config: DecodingConfig,
    prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None,
) -> list[list[Hypothesis]]:
    bos, pad, eos, unk = _special_ids(model)
    vocab = int(model.config.vocab_size)
    device = input_ids.device
    batch, src_len = input_ids.shape
    beam = config.beam_size
    max_len = config.max_length(src_len, int(model.config.max_position_embeddings))
    if config.min_len > max_len:
        raise ValueError(f"min_len={config.min_len} exceeds max_len={max_len}; adjust max_len_a/max_len_b")
    prefixes = _prefix_lists(prefix_tokens, batch, pad, eos)
    longest_prefix = max((len(p) for p in prefixes), default=0)
    if longest_prefix > max_len:
        raise ValueError(f"a prefix of {longest_prefix} tokens does not fit max_len={max_len}; raise max_len_b")
    trie = config.constraint_trie
    ngram = config.no_repeat_ngram_size

    encoder_out = _encode(model, input_ids, attention_mask, patch_images, patch_masks)
    row_to_sample = torch.arange(batch, device=device).repeat_interleave(beam)
    encoder_out = model.reorder_encoder_outputs(encoder_out, row_to_sample)

    rows = batch * beam
    tokens = torch.full((rows, max_len + 2), pad, dtype=torch.long, device=device)
    tokens[:, 0] = bos
    token_scores = torch.zeros(rows, max_len + 1, dtype=torch.float32, device=device)
    # Only the first beam of each sample is live at step 0 (all beams are identical then).
    cumulative = torch.full((batch, beam), float("-inf"), device=device)
    cumulative[:, 0] = 0.0
    cumulative = cumulative.view(-1)

    active = list(range(batch))  # original sample index of each live sample, in row-block order
    prefix_len = torch.tensor([len(p) for p in prefixes], dtype=torch.long, device=device)
    prefix_buf = torch.full((batch, max(longest_prefix, 1)), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        prefix_buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    finalized: list[list[Hypothesis]] = [[] for _ in range(batch)]
    cache = None
    code_masks = None

    for step in range(max_len + 1):
        n_live = len(active)
        rows = n_live * beam
        if config.gen_code:
            code_masks = torch.ones(rows, dtype=torch.bool, device=device)
        if cache is None:
            logits, cache = model.decode(tokens[:, :1], encoder_out, use_cache=True, code_masks=code_masks)
        else:
            logits, cache = model.decode(
                tokens[:, step : step + 1], encoder_out, past_key_values=cache, use_cache=True, code_masks=code_masks
            )
        logits = logits[:, -1].float() / config.temperature

        row_prefix_len = prefix_len.repeat_interleave(beam)
        forced = row_prefix_len > step  # rows still inside their forced prefix
        free = ~forced

        # Masks that renormalise (trie, token range) go on the logits, before log-softmax (as in BiomedGPT
        # models/sequence_generator.py, EnsembleModel.forward_decoder).
        if trie is not None and bool(free.any()):
            history = tokens[:, : step + 1].tolist()
            free_rows = free.nonzero().flatten().tolist()
            lengths = row_prefix_len.tolist()
            trie_prefixes = [[bos, *history[r][lengths[r] + 1 :]] for r in free_rows]
            allowed = trie.constraint_mask(trie_prefixes, vocab, device)
            logits[free_rows] = logits[free_rows].masked_fill(~allowed, float("-inf"))
        if config.allowed_token_range is not None:
            start, end = config.allowed_token_range
            logits[free, 4:start] = float("-inf")
            logits[free, end:] = float("-inf")

        raw = _nan_to_neg_inf(F.log_softmax(logits, dim=-1))  # fully masked rows give NaN
        lprobs = raw.clone()
        lprobs[:, pad] = float("-inf")
        lprobs[:, unk] -= config.unk_penalty
        if config.gen_code and step < max_len:
            lprobs[:, :4] = float("-inf")
        if step < config.min_len:
            lprobs[:, eos] = float("-inf")
        if ngram > 0 and step + 1 >= ngram:
            history = tokens[:, : step + 1].tolist()
            for r in free.nonzero().flatten().tolist():
                banned = _banned_ngram_tokens(history[r], ngram)
                if banned:
                    lprobs[r, banned] = float("-inf")
        if bool(forced.any()):
            # Forced rows keep only their prefix token, with its true log-prob.
            forced_rows = forced.nonzero().flatten()
            want = prefix_buf.repeat_interleave(beam, dim=0)[forced_rows, step]
            kept = raw[forced_rows, want]
            lprobs[forced_rows] = float("-inf")
            lprobs[forced_rows, want] = kept
        if step >= max_len:
            eos_scores = lprobs[:, eos].clone()
            lprobs.fill_(float("-inf"))
            lprobs[:, eos] = eos_scores

        # Candidates: the 2*beam best (beam, token) extensions per sample.
        totals = (cumulative[:, None] + lprobs).view(n_live, beam * vocab)
        n_cand = min(2 * beam, beam * vocab - 1)
        cand_scores, cand_flat = totals.topk(n_cand, dim=1)
        cand_lprobs = lprobs.view(n_live, beam * vocab).gather(1, cand_flat)
        cand_tokens = cand_flat % vocab
        cand_rows = cand_flat // vocab + torch.arange(n_live, device=device)[:, None] * beam
        cand_is_eos = cand_tokens.eq(eos)

        # Finalise eos candidates that made the top beam_size.
        to_finalize = cand_is_eos[:, :beam] & torch.isfinite(cand_scores[:, :beam])
        if bool(to_finalize.any()):
            where = to_finalize.nonzero().tolist()
            src_rows = cand_rows[:, :beam][to_finalize]
            hyp_tokens = torch.cat(
                [tokens[src_rows, 1 : step + 1], torch.full((len(where), 1), eos, device=device)], dim=1
            ).cpu()
            hyp_scores = torch.cat(
                [token_scores[src_rows, :step], cand_lprobs[:, :beam][to_finalize][:, None]], dim=1
            ).cpu()
            totals_fin = cand_scores[:, :beam][to_finalize].tolist()
            for k, (live_index, _) in enumerate(where):
                sample = active[live_index]
                if len(finalized[sample]) >= beam:
                    continue
                score = totals_fin[k]
                if config.normalize_scores:
                    score = score / (step + 1) ** config.len_penalty
                finalized[sample].append(
                    Hypothesis(hyp_tokens[k], float(score), hyp_scores[k], prefix_len=len(prefixes[sample]))
                )

        # Continue with the best beam_size non-eos candidates.
        order = torch.arange(n_cand, device=device).expand(n_live, -1)
        rank = torch.where(cand_is_eos, order + n_cand, order)
        chosen = rank.topk(beam, dim=1, largest=False).indices.sort(dim=1).values
        next_scores = cand_scores.gather(1, chosen)
        next_scores = next_scores.masked_fill(cand_is_eos.gather(1, chosen), float("-inf"))

        # A sample stops with beam_size finished hypotheses, at max_len, or when no live hypothesis is finite.
        alive = torch.isfinite(next_scores).any(dim=1).tolist()
        done = [len(finalized[active[i]]) >= beam or step >= max_len or not alive[i] for i in range(n_live)]
        if all(done):
            break
        keep = torch.tensor([not d for d in done], device=device)
        keep_index = keep.nonzero().flatten()
        n_keep = len(keep_index)
        chosen = chosen[keep_index]
        new_rows = cand_rows[keep_index].gather(1, chosen).view(-1)
        tokens = tokens[new_rows]
        tokens[:, step + 1] = cand_tokens[keep_index].gather(1, chosen).view(-1)
        token_scores = token_scores[new_rows]
        token_scores[:, step] = cand_lprobs[keep_index].gather(1, chosen).view(-1)
        cumulative = next_scores[keep_index].view(-1)
        if n_keep < n_live:
            kept_rows = (keep_index[:, None] * beam + torch.arange(beam, device=device)).view(-1)
            encoder_out = model.reorder_encoder_outputs(encoder_out, kept_rows)
            active = [active[i] for i in keep_index.tolist()]
            prefix_len = prefix_len[keep_index]
            prefix_buf = prefix_buf[keep_index]
        # Greedy decoding without pruning keeps every row in place: skip the copy.
        if n_keep < n_live or not torch.equal(new_rows, torch.arange(rows, device=device)):
            cache = model.reorder_cache(cache, new_rows)

    for hyps in finalized:
        hyps.sort(key=lambda h: h.score, reverse=True)
    return finalized


# ----------------------------------------------------------------------------------------------------- scoring


def _candidate_lists(
    candidates: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]], batch: int
) -> list[list[list[int]]]:
    """Per-sample candidate lists from either a shared list or one list per sample."""
    if len(candidates) == 0:
        raise ValueError("candidates is empty")
    first = candidates[0]
    if isinstance(first, torch.Tensor):
        shared = first.dim() == 1
    else:
        shared = len(first) == 0 or not isinstance(first[0], Sequence | torch.Tensor)
    if shared:
        common = [[int(t) for t in c] for c in candidates]  # type: ignore[union-attr]
        return [common for _ in range(batch)]
    if len(candidates) != batch:
        raise ValueError(f"got candidate lists for {len(candidates)} samples, batch has {batch}")
    return [[[int(t) for t in c] for c in per_sample] for per_sample in candidates]  # type: ignore[union-attr]


def score_candidates(
    model: BiomedGPTForConditionalGeneration,
    input_ids: torch.Tensor,
    candidates: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]],
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 20,
    constraint_trie: Trie | None = None,
    prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None,
    append_eos: bool = True,
) -> torch.Tensor:
    """Teacher-forced log-likelihood of every candidate answer, float32 ``[B, N]`` (the all-candidate evaluation).

    ``candidates``: token lists without bos/eos, shared by the batch (``[[ids], ...]``) or one list per sample
    (``[[[ids], ...], ...]``; shorter lists are padded with -inf scores). The decoder reads
    ``[bos] + prefix + candidate`` and the score is the sum of the log-probs of ``candidate + [eos]`` (prefix
    excluded, no length normalisation). With ``constraint_trie`` the logits of those positions are masked to the
    trie before log-softmax, as the original. The encoder runs once; ``chunk_size`` candidates per sample are
    decoded per forward pass.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bos, pad, eos, _ = _special_ids(model)
    vocab = int(model.config.vocab_size)
    device = input_ids.device
    batch = input_ids.shape[0]
    per_sample = _candidate_lists(candidates, batch)
    prefixes = _prefix_lists(prefix_tokens, batch, pad, eos)
    n_max = max(len(c) for c in per_sample)
    result = torch.full((batch, n_max), float("-inf"), dtype=torch.float32)

    with _EvalMode(model):
        encoder_out = _encode(model, input_ids, attention_mask, patch_images, patch_masks)
        for start in range(0, n_max, chunk_size):
            pairs = [(b, j) for b in range(batch) for j in range(start, min(start + chunk_size, len(per_sample[b])))]
            if not pairs:
                continue
            inputs, targets, score_from = [], [], []
            for b, j in pairs:
                answer = per_sample[b][j] + ([eos] if append_eos else [])
                if not answer:
                    raise ValueError("an empty candidate with append_eos=False has nothing to score")
                inputs.append([bos, *prefixes[b], *answer[:-1]])
                targets.append([*prefixes[b], *answer])
                score_from.append(len(prefixes[b]))
            width = max(len(x) for x in inputs)
            decoder_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
            for i, x in enumerate(inputs):
                decoder_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            decoder_ids = decoder_ids.to(device)
            index = torch.tensor([b for b, _ in pairs], device=device)
            logits, _ = model.decode(
                decoder_ids,
                model.reorder_encoder_outputs(encoder_out, index),
                decoder_attention_mask=decoder_ids.ne(pad),
            )
            # Only the candidate positions are scored: gather them before the float32 log-softmax.
            pair_idx, pos_idx, tgt, trie_prefixes = [], [], [], []
            for i, (target, first) in enumerate(zip(targets, score_from)):
                answer = target[first:]
                for t in range(first, len(target)):
                    pair_idx.append(i)
                    pos_idx.append(t)
                    tgt.append(target[t])
                    trie_prefixes.append([bos, *answer[: t - first]])
            selected = logits[torch.tensor(pair_idx, device=device), torch.tensor(pos_idx, device=device)].float()
            if constraint_trie is not None:
                allowed = constraint_trie.constraint_mask(trie_prefixes, vocab, device)
                selected = selected.masked_fill(~allowed, float("-inf"))
            lprobs = _nan_to_neg_inf(F.log_softmax(selected, dim=-1))
            token_lprobs = lprobs.gather(1, torch.tensor(tgt, device=device)[:, None]).squeeze(1)
            sums = torch.zeros(len(pairs), dtype=torch.float32, device=device)
            sums.index_add_(0, torch.tensor(pair_idx, device=device), token_lprobs)
            for (b, j), value in zip(pairs, sums.cpu().tolist()):
                result[b, j] = value
    return result.to(device)
