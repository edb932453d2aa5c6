import math

import numpy as np
import pytest

from biomedgpt.data.noising import (
    RANDOM_TOKEN_RANGE,
    add_insertion_noise,
    poisson_span_probabilities,
    replace_with_random,
    sample_mask_spans,
    whole_word_mask,
)
from biomedgpt.data.transforms import rng_for

BOS, EOS, MASK = 0, 2, 50264
FIRST_CODE = 50265  # <code_0>; codes and bins lie at and above this id (BiomedGPT tasks/ofa_task.py)


def sentence(rng: np.random.Generator, num_words: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[bos] + words of 1-3 BPE pieces + [eos], every token id unique (so outputs can be aligned back)."""
    pieces = rng.integers(1, 4, size=num_words)
    length = int(pieces.sum()) + 2
    tokens = np.concatenate([[BOS], 1000 + np.arange(length - 2), [EOS]]).astype(np.int64)
    starts = np.concatenate([[True]] + [[True] + [False] * (p - 1) for p in pieces] + [[True]])
    return tokens, starts, num_words


def word_of(starts: np.ndarray) -> np.ndarray:
    """Index of the word each token belongs to (bos is word 0, eos the last)."""
    return np.cumsum(starts) - 1


def covered(spans: list[tuple[int, int]], length: int) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def gaps(tokens: np.ndarray, output: np.ndarray) -> list[tuple[int, int, int]]:
    """Align the noised output back to the (unique-id) original: (first missing pos, end, #masks standing in)."""
    position = {int(t): i for i, t in enumerate(tokens)}
    kept = [position[int(t)] for t in output if int(t) in position]
    assert kept == sorted(kept), "surviving tokens must keep their order"
    result, masks, previous = [], 0, -1
    for token in output:
        if int(token) in position:
            here = position[int(token)]
            if here != previous + 1 or masks:
                result.append((previous + 1, here, masks))
            previous, masks = here, 0
        else:
            masks += 1
    return result


# ----------------------------------------------------------------------------------------------------------------------


def test_poisson_span_distribution_matches_bart():
    probs = poisson_span_probabilities(3.0)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[0] == pytest.approx(math.exp(-3.0), rel=1e-6) and probs[3] == pytest.approx(probs[2], rel=1e-6)
    assert len(probs) == 18 and probs[-1] < 1e-7 <= probs[-2]  # cut where the pmf tail falls below 1e-7, as fairseq
    wide = poisson_span_probabilities(200.0)
    assert len(wide) == 128 and wide.argmax() == 127  # never beyond k < 128; no collapse onto k = 0 for large lambda


def test_spans_cover_whole_words_and_never_bos_or_eos():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens, starts, _ = sentence(rng, int(rng.integers(1, 40)))
        spans, _ = sample_mask_spans(starts, rng, 0.3, 3.0)
        for start, end in spans:
            assert 0 < start < end <= len(tokens) - 1
            assert starts[start], "a span starts at a word start"
            assert end == len(tokens) - 1 or starts[end], "a span ends at the next word start (or before eos)"


def test_about_thirty_percent_of_words_are_masked():
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(400):
        tokens, starts, num_words = sentence(rng, 80)
        spans, _ = sample_mask_spans(starts, rng, 0.3, 3.0)
        words = np.unique(word_of(starts)[covered(spans, len(tokens))])
        assert len(words) <= math.ceil(0.3 * num_words)  # the budget is an upper bound (spans may overlap)
        fractions.append(len(words) / num_words)
    # Overlapping spans and spans cut at eos leave the realised share a little under the 0.3 budget.
    assert 0.24 < np.mean(fractions) <= 0.3
    # Single-word spans never overlap, so they hit the budget exactly: ceil(0.3 * 10) = 3 words, not 4.
    tokens, starts, num_words = sentence(rng, 10)
    spans, inserts = sample_mask_spans(starts, rng, 0.3, None)
    assert len(spans) == 3 and inserts == 0
    assert all(np.sum(starts[s:e]) == 1 for s, e in spans)


def test_replace_length_one_turns_each_span_into_one_mask():
    rng = np.random.default_rng(2)
    saw_insert = False
    for trial in range(150):
        tokens, starts, _ = sentence(rng, int(rng.integers(5, 60)))
        original = tokens.copy()
        output = whole_word_mask(tokens, starts, rng_for(0, 0, trial), MASK, 0.3, 3.0, replace_length=1)
        spans, num_inserts = sample_mask_spans(starts, rng_for(0, 0, trial), 0.3, 3.0)  # same first draws
        assert np.array_equal(tokens, original), "input must not be modified"
        assert output[0] == BOS and output[-1] == EOS and np.sum(output == BOS) == 1 and np.sum(output == EOS) == 1
        assert set(output.tolist()) <= set(tokens.tolist()) | {MASK}
        # Surviving <mask>s: one per span, less spans whose start another span's continuation swallowed (merged),
        # plus the zero-length draws inserted as extra <mask>s.
        assert np.sum(output == MASK) == len(spans) - _merged(spans) + num_inserts
        if num_inserts:
            saw_insert = True
            continue  # inserted <mask>s may land anywhere; the alignment below needs the pure-masking case
        hidden = covered(spans, len(tokens))
        alignment = gaps(tokens, output)
        assert sum(end - first for first, end, _ in alignment) == hidden.sum(), "exactly the covered tokens vanish"
        for first, end, masks in alignment:
            assert hidden[first:end].all()
            assert starts[first] and (end == len(tokens) - 1 or starts[end]), "gaps are whole words"
            # One <mask> per (possibly merged) span: at least one, at most one per word in the gap.
            assert 1 <= masks <= np.sum(starts[first:end])
    assert saw_insert  # Poisson(3) draws zero-length spans ~5% of the time


def _merged(spans: list[tuple[int, int]]) -> int:
    """Spans whose start falls inside another span's continuation: their <mask> is deleted with that continuation."""
    return sum(any(s < start < e for s, e in spans if (s, e) != (start, end)) for start, end in set(spans))


def test_replace_length_minus_one_keeps_length_and_zero_deletes():
    rng = np.random.default_rng(3)
    for trial in range(50):
        tokens, starts, _ = sentence(rng, 30)
        spans, num_inserts = sample_mask_spans(starts, rng_for(1, 0, trial), 0.3, 3.0)
        hidden = covered(spans, len(tokens))
        same_length = whole_word_mask(tokens, starts, rng_for(1, 0, trial), MASK, replace_length=-1)
        assert len(same_length) == len(tokens) + num_inserts
        if num_inserts == 0:
            assert np.array_equal(same_length, np.where(hidden, MASK, tokens))
        deleted = whole_word_mask(tokens, starts, rng_for(1, 0, trial), MASK, poisson_lambda=None, replace_length=0)
        single_spans, _ = sample_mask_spans(starts, rng_for(1, 0, trial), 0.3, None)
        assert np.array_equal(deleted, tokens[~covered(single_spans, len(tokens))])


def test_random_replacement_never_produces_codes_or_bins():
    rng = np.random.default_rng(4)
    tokens, starts, _ = sentence(rng, 200)
    output = whole_word_mask(
        tokens, starts, rng, MASK, replace_length=-1, random_ratio=1.0, random_range=RANDOM_TOKEN_RANGE
    )
    new = np.setdiff1d(output, tokens)
    assert len(new) > 50 and new.min() >= 4 and new.max() < FIRST_CODE
    # Summarisation decoder-input noise: ~20% of positions, uniform over [4, 50265), codes/bins in the input untouched
    # unless replaced.
    codes = np.full(20000, FIRST_CODE + 17)
    noised = replace_with_random(codes, 0.2, np.random.default_rng(5))
    changed = noised != codes
    assert abs(changed.mean() - 0.2) < 0.015
    assert noised[changed].min() >= 4 and noised[changed].max() < FIRST_CODE
    assert noised[changed].max() > 45000 and noised[changed].min() < 5000  # spread over the whole BPE range
    assert np.array_equal(replace_with_random(codes, 0.0, np.random.default_rng(5)), codes)


def test_insertion_noise_keeps_bos_eos_and_original_order():
    tokens = np.concatenate([[BOS], 1000 + np.arange(40), [EOS]])
    for seed in range(20):
        output = add_insertion_noise(tokens, 0.1, np.random.default_rng(seed), MASK)
        assert len(output) == len(tokens) + math.ceil(len(tokens) * 0.1)
        assert output[0] == BOS and output[-1] == EOS
        assert np.array_equal(output[output != MASK], tokens)
    mixed = add_insertion_noise(tokens, 0.5, np.random.default_rng(0), MASK, random_ratio=0.5, random_range=(4, 9))
    inserted = mixed[~np.isin(mixed, tokens)]
    assert np.sum(inserted == MASK) == 10 and np.all((inserted >= 4) & (inserted < 9) | (inserted == MASK))
    words, starts, _ = sentence(np.random.default_rng(0), 20)
    extra = whole_word_mask(words, starts, np.random.default_rng(0), MASK, mask_ratio=0.0, insert_ratio=0.2)
    assert len(extra) == len(words) + math.ceil(len(words) * 0.2) and extra[0] == BOS and extra[-1] == EOS


def test_noising_is_deterministic_per_generator():
    tokens, starts, _ = sentence(np.random.default_rng(6), 60)
    first = whole_word_mask(tokens, starts, rng_for(3, 1, "doc-7", "text_mask"), MASK)
    assert np.array_equal(first, whole_word_mask(tokens, starts, rng_for(3, 1, "doc-7", "text_mask"), MASK))
    assert not np.array_equal(first, whole_word_mask(tokens, starts, rng_for(3, 2, "doc-7", "text_mask"), MASK))
    assert not np.array_equal(first, whole_word_mask(tokens, starts, rng_for(4, 1, "doc-7", "text_mask"), MASK))
    noised = replace_with_random(tokens, 0.2, rng_for(3, 1, "doc-7", "decoder"))
    assert np.array_equal(noised, replace_with_random(tokens, 0.2, rng_for(3, 1, "doc-7", "decoder")))


def test_degenerate_inputs():
    rng = np.random.default_rng(0)
    assert whole_word_mask(np.array([BOS, EOS]), np.array([True, True]), rng, MASK).tolist() == [BOS, EOS]
    no_words = whole_word_mask(np.array([BOS, 5, 6, EOS]), np.array([True, False, False, True]), rng, MASK)
    assert no_words.tolist() == [BOS, 5, 6, EOS]
    with pytest.raises(ValueError):
        whole_word_mask(np.array([BOS, 5, EOS]), np.array([True, True, True]), rng, MASK, replace_length=2)
    with pytest.raises(ValueError):
        whole_word_mask(np.array([BOS, 5, EOS]), np.array([True, True]), rng, MASK)


def test_bare_text_without_bos_eos_masks_its_first_and_last_words_too():
    tokens, starts, _ = sentence(np.random.default_rng(7), 12)
    bare, bare_starts = tokens[1:-1], starts[1:-1]
    first_masked = last_masked = False
    for trial in range(60):
        output = whole_word_mask(bare, bare_starts, rng_for(5, 0, trial), MASK, has_bos_eos=False)
        # Exactly the wrapped call, stripped: same draws, same result.
        assert np.array_equal(output, whole_word_mask(tokens, starts, rng_for(5, 0, trial), MASK)[1:-1])
        first_masked |= output[0] != bare[0]
        last_masked |= output[-1] != bare[-1]
    assert first_masked and last_masked
