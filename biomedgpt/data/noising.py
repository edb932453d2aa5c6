"""BART-style text noising for the text-infilling pretraining task and summarisation decoder inputs.

The originals: ``add_whole_word_mask`` of BiomedGPT data/pretrain_data/unify_dataset.py (its settings default in
tasks/pretrain_tasks/unify_task.py) and ``add_noise_to_tgt`` of data/nlg_data/summary_dataset.py.

All randomness comes from the ``numpy.random.Generator`` passed in (build one with
:func:`biomedgpt.data.transforms.rng_for`), so a resumed or re-sharded run rebuilds identical examples.

Sequences given to :func:`whole_word_mask` and :func:`add_insertion_noise` **include bos and eos**: like the
original (which noises ``[bos] + text + [eos]`` and then strips both), the first and last positions are never masked,
deleted or preceded/followed by insertions. A caller without bos/eos should wrap the text with two placeholders and
strip them afterwards. :func:`replace_with_random` is different: it noises every position it is given (the original
noises the decoder-input tokens before prepending bos).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "RANDOM_TOKEN_RANGE",
    "add_insertion_noise",
    "poisson_span_probabilities",
    "replace_with_random",
    "sample_mask_spans",
    "whole_word_mask",
]

# Ids drawn by random replacement in the original vocabulary (laid out by BiomedGPT tasks/ofa_task.py): [4, 50265) =
# every BPE token plus <mask> (50264), never the specials 0-3, VQ-GAN codes or location bins. Callers with another
# vocabulary pass their own.
RANDOM_TOKEN_RANGE = (4, 50265)
# Span lengths are Poisson(lambda) truncated at k < 128 (and where the pmf drops below 1e-7), as in fairseq/BART.
_MAX_SPAN = 128
_PMF_FLOOR = 1e-7


def poisson_span_probabilities(poisson_lambda: float) -> np.ndarray:
    """Probabilities of span lengths 0, 1, 2, ... (Poisson pmf, cut at k < 128 or after the tail falls below 1e-7).

    fairseq stops at the first term below 1e-7 even before the mode, which for lambda > ~16 leaves only k = 0 (every
    span an insertion); here the cut only applies past the mode. For the lambda = 3 of BiomedGPT both are identical.
    """
    probs = []
    term = math.exp(-poisson_lambda)
    for k in range(_MAX_SPAN):
        probs.append(term)
        if term < _PMF_FLOOR and k >= poisson_lambda:
            break
        term *= poisson_lambda / (k + 1)
    array = np.asarray(probs, dtype=np.float64)
    return array / array.sum()


def _check_range(random_range: tuple[int, int]) -> tuple[int, int]:
    low, high = int(random_range[0]), int(random_range[1])
    if high <= low:
        raise ValueError(f"random_range must be a non-empty half-open range [low, high), got {random_range}")
    return low, high


def sample_mask_spans(
    word_starts: np.ndarray | Sequence[bool],
    rng: np.random.Generator,
    mask_ratio: float = 0.3,
    poisson_lambda: float | None = 3.0,
) -> tuple[list[tuple[int, int]], int]:
    """Choose the whole-word spans to mask: returns ``(spans, num_inserts)``.

    ``spans`` are half-open token ranges ``(start, end)`` in the order they were drawn; they may overlap or touch
    (BART draws them independently). The budget is ``ceil(mask_ratio * #word starts)`` words (the first and last
    positions never count: they are bos/eos). Span lengths in *words* are drawn from
    :func:`poisson_span_probabilities` until they cover the budget, the last one trimmed so they sum to it exactly.
    Zero-length draws become ``num_inserts`` insertions instead. Each remaining span starts at a distinct random word
    start and runs over its length in words, each word through to the next word start, stopping before eos.
    ``poisson_lambda=None`` gives single-word spans (fairseq ``mask_length="word"``).
    """
    is_start = np.asarray(word_starts, dtype=bool).copy()
    length = len(is_start)
    if length < 3:
        return [], 0
    is_start[0] = is_start[-1] = False  # bos / eos are never masked
    start_positions = np.flatnonzero(is_start)
    # The epsilon keeps float error from adding a word (10 * 0.3 is 3.0000000000000004 in binary floating point).
    num_to_mask = int(math.ceil(len(start_positions) * mask_ratio - 1e-9))
    if num_to_mask == 0:
        return [], 0

    if poisson_lambda is None:
        lengths = np.ones(num_to_mask, dtype=np.int64)
        num_inserts = 0
    else:
        probs = poisson_span_probabilities(poisson_lambda)
        lengths = rng.choice(len(probs), size=num_to_mask, p=probs)
        while lengths.sum() < num_to_mask:
            lengths = np.concatenate([lengths, rng.choice(len(probs), size=num_to_mask, p=probs)])
        # Trim: keep draws up to the one that reaches the budget, shortened so the total is exactly the budget.
        cumulative = np.cumsum(lengths)
        last = int(np.searchsorted(cumulative, num_to_mask))
        lengths = lengths[: last + 1].copy()
        lengths[last] = num_to_mask - (cumulative[last - 1] if last > 0 else 0)
        num_inserts = int((lengths == 0).sum())
        lengths = lengths[lengths > 0]
        if len(lengths) == 0:
            return [], num_inserts

    # Fewer word starts than spans cannot happen (each span has >= 1 word and the budget <= #starts for ratio <= 1),
    # but cap anyway so a ratio > 1 degrades to "mask every word" instead of failing.
    chosen = rng.permutation(start_positions)[: len(lengths)]
    spans = []
    for start, words in zip(chosen.tolist(), lengths.tolist()):
        end = start + 1
        remaining = words - 1
        # Extend through continuation tokens; a new word start costs one word; never run into eos.
        while end < length - 1:
            if is_start[end]:
                if remaining == 0:
                    break
                remaining -= 1
            end += 1
        spans.append((start, end))
    return spans, num_inserts


def _insert(
    tokens: np.ndarray,
    count: int,
    rng: np.random.Generator,
    mask_id: int,
    random_ratio: float,
    random_range: tuple[int, int],
) -> np.ndarray:
    """Insert ``count`` noise tokens at random positions strictly between the first and last token."""
    if count <= 0:
        return tokens
    num_tokens = len(tokens)
    total = num_tokens + count
    # Output slots 1 .. total-2 are eligible, so the first (bos) and last (eos) tokens keep their places.
    positions = rng.permutation(total - 2)[:count] + 1
    is_noise = np.zeros(total, dtype=bool)
    is_noise[positions] = True
    result = np.empty(total, dtype=tokens.dtype)
    result[~is_noise] = tokens
    num_random = int(math.ceil(count * random_ratio))
    result[positions[num_random:]] = mask_id
    if num_random:
        low, high = _check_range(random_range)
        result[positions[:num_random]] = rng.integers(low, high, size=num_random)
    return result


def add_insertion_noise(
    tokens: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    mask_id: int,
    random_ratio: float = 0.0,
    random_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Insert ``ceil(len(tokens) * ratio)`` tokens: ``<mask>``, or for a ``random_ratio`` share, random ids.

    ``tokens`` includes bos/eos, which stay first and last. ``random_range`` defaults to ``[4, mask_id + 1)``.
    """
    tokens = np.asarray(tokens)
    if ratio <= 0.0 or len(tokens) < 2:
        return tokens.copy()
    count = int(math.ceil(len(tokens) * ratio))
    return _insert(tokens, count, rng, mask_id, random_ratio, random_range or (4, mask_id + 1))


def whole_word_mask(
    tokens: np.ndarray,
    word_starts: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    mask_ratio: float = 0.3,
    poisson_lambda: float | None = 3.0,
    replace_length: int = 1,
    random_ratio: float = 0.0,
    random_range: tuple[int, int] | None = None,
    insert_ratio: float = 0.0,
    has_bos_eos: bool = True,
) -> np.ndarray:
    """BART text infilling over whole words (BiomedGPT unify_dataset.py ``add_whole_word_mask``); returns a new array,
    ``tokens`` is not modified.

    ``tokens`` is ``[bos] + text + [eos]`` and ``word_starts`` flags, per token, whether it begins a word (GPT-2 BPE
    ``is_beginning_of_word``); the flags of the first and last token are ignored and those tokens are kept.
    With ``has_bos_eos=False`` the tokens are the bare text: they are wrapped in two placeholders internally and the
    result comes back bare too, so the first and last word can be masked exactly as in the original (which masks
    ``[bos] + text + [eos]`` and strips both afterwards).
    Spans come from :func:`sample_mask_spans`. Per span:

    - ``replace_length=1``: the span becomes one ``<mask>`` (spans that overlap merge into one; adjacent spans keep a
      ``<mask>`` each, as in BART);
    - ``replace_length=-1``: every token of the span becomes ``<mask>`` (length kept);
    - ``replace_length=0``: the span is deleted.

    A ``random_ratio`` share of spans get random ids from ``random_range`` (default ``[4, mask_id + 1)``) instead of
    ``<mask>``. Zero-length span draws are inserted as extra ``<mask>`` tokens afterwards (insertion noise over the
    masked sequence), and so are ``ceil(len * insert_ratio)`` more when ``insert_ratio > 0`` (BART's separate
    ``insert`` option; OFA leaves it at 0).
    """
    if replace_length not in (-1, 0, 1):
        raise ValueError(f"replace_length must be -1, 0 or 1, got {replace_length}")
    source = np.asarray(tokens).copy()
    if len(word_starts) != len(source):
        raise ValueError(f"word_starts has {len(word_starts)} flags for {len(source)} tokens")
    if not has_bos_eos:
        # Positions 0 and -1 are never touched, so any placeholder value works and stripping them is exact.
        wrapped = np.concatenate([[0], source, [0]]).astype(source.dtype)
        flags = np.concatenate([[True], np.asarray(word_starts, dtype=bool), [True]])
        noised = whole_word_mask(
            wrapped,
            flags,
            rng,
            mask_id,
            mask_ratio,
            poisson_lambda,
            replace_length,
            random_ratio,
            random_range,
            insert_ratio,
            has_bos_eos=True,
        )
        return noised[1:-1]
    random_range = _check_range(random_range or (4, mask_id + 1))

    spans, num_inserts = sample_mask_spans(word_starts, rng, mask_ratio, poisson_lambda)
    keep = np.ones(len(source), dtype=bool)
    if spans:
        is_random = rng.random(len(spans)) < random_ratio
        starts = np.array([start for start, _ in spans], dtype=np.int64)
        if replace_length == 0:
            keep[starts] = False
        else:
            source[starts] = mask_id
            if is_random.any():
                source[starts[is_random]] = rng.integers(*random_range, size=int(is_random.sum()))
        # Continuation tokens: deleted (replace_length 0/1) or masked in place (-1). Deleting after all starts have
        # been written means a start covered by another span's continuation disappears, merging the two spans.
        for (start, end), random_span in zip(spans, is_random.tolist()):
            if end - start <= 1:
                continue
            if replace_length == -1:
                if random_span:
                    source[start + 1 : end] = rng.integers(*random_range, size=end - start - 1)
                else:
                    source[start + 1 : end] = mask_id
            else:
                keep[start + 1 : end] = False
    source = source[keep]

    if num_inserts:
        source = _insert(source, num_inserts, rng, mask_id, random_ratio, random_range)
    if insert_ratio > 0.0:
        source = add_insertion_noise(source, insert_ratio, rng, mask_id, random_ratio, random_range)
    return source


def replace_with_random(
    tokens: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    random_range: tuple[int, int] = RANDOM_TOKEN_RANGE,
) -> np.ndarray:
    """Replace each token independently with probability ``ratio`` by a uniform id from ``random_range``.

    Summarisation decoder-input noise (``--noise-ratio 0.2`` in BiomedGPT scripts/text_sum/train_meqsum.sh): apply it
    to the target tokens *before* prepending bos (every position given here is eligible) and keep the clean tokens
    as the loss target. The default range is the original vocabulary's BPE tokens plus ``<mask>``, never codes or
    bins.
    """
    low, high = _check_range(random_range)
    source = np.asarray(tokens).copy()
    if ratio <= 0.0 or len(source) == 0:
        return source
    chosen = rng.random(len(source)) < ratio
    source[chosen] = rng.integers(low, high, size=int(chosen.sum()))
    return source
