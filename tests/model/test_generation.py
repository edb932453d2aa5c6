"""Tests for biomedgpt.model.generation: beam search, answer tries, candidate scoring (real model, no mocks).

Every expected value is recomputed independently of the decoding loop: full-prefix forward passes without the KV
cache, ``log_softmax`` of ``model(...)`` logits and brute-force enumeration of the answer set.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from model_configs import TEST_VOCAB, small_test_config

from biomedgpt import BiomedGPTForConditionalGeneration
from biomedgpt.model.generation import DecodingConfig, Hypothesis, Trie, generate, score_candidates
from biomedgpt.tokenizer import BiomedGPTTokenizer

BOS, PAD, EOS, UNK = 0, 1, 2, 3
VOCAB = TEST_VOCAB

SOURCES = [[BOS, 10, 11, 12, EOS], [BOS, 20, 21, 22, 23, EOS], [BOS, 30, 31, EOS]]
# Two targets per source, so the trained model is uncertain (about 50/50) at one step and stops at varying lengths.
TARGETS = [[[40, 41], [40, 42, 43]], [[50], [51, 52, 53, 54]], [[60, 61, 62], [60]]]
ANSWERS = [[40, 41], [40, 42, 43], [40], [50], [60, 61, 62]]


def pad_rows(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def random_model() -> BiomedGPTForConditionalGeneration:
    torch.manual_seed(0)
    return BiomedGPTForConditionalGeneration(small_test_config(ffn_dim=128, resnet_type="resnet50")).eval()


@pytest.fixture(scope="module")
def trained_model() -> BiomedGPTForConditionalGeneration:
    """A model fitted for a few steps to SOURCES -> TARGETS: it emits eos at different steps (about 1.5 s)."""
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(small_test_config(ffn_dim=128, resnet_type="resnet50"))
    pairs = [(s, t + [EOS]) for s, ts in zip(SOURCES, TARGETS) for t in ts]
    src, tgt = pad_rows([s for s, _ in pairs]), pad_rows([t for _, t in pairs])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=src, labels=tgt).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32), torch.tensor([True, False, True])


def token_log_probs(
    model: BiomedGPTForConditionalGeneration,
    input_ids: torch.Tensor,
    target: list[int],
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    trie: Trie | None = None,
    answer_start: int = 0,
) -> torch.Tensor:
    """log p(target[t] | bos + target[:t]) for one sample from a plain uncached ``model(...)`` forward."""
    decoder_ids = torch.tensor([[BOS, *target[:-1]]])
    with torch.no_grad():
        logits = (
            model(
                input_ids=input_ids, patch_images=patch_images, patch_masks=patch_masks, decoder_input_ids=decoder_ids
            )
            .logits[0]
            .float()
        )
    if trie is not None:
        allowed = trie.teacher_forcing_mask(target, VOCAB, answer_start=answer_start)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return F.log_softmax(logits, dim=-1).gather(1, torch.tensor(target)[:, None]).squeeze(1)


def reference_greedy(
    model: BiomedGPTForConditionalGeneration,
    input_ids: torch.Tensor,
    max_len: int,
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy decoding that recomputes the whole prefix at every step (no cache), pad never chosen."""
    with torch.no_grad():
        encoder_out = model.encode(input_ids, patch_images=patch_images, patch_masks=patch_masks)
        prefix, scores = [BOS], []
        for step in range(max_len + 1):
            logits, _ = model.decode(torch.tensor([prefix]), encoder_out)
            lprobs = F.log_softmax(logits[0, -1].float(), dim=-1)
            lprobs[PAD] = float("-inf")
            token = EOS if step == max_len else int(lprobs.argmax())
            prefix.append(token)
            scores.append(float(lprobs[token]))
            if token == EOS:
                break
    return prefix[1:], scores


def repeated_bigrams(tokens: list[int]) -> bool:
    grams = list(zip(tokens, tokens[1:]))
    return len(grams) != len(set(grams))


# --------------------------------------------------------------------------------------------------- trie


def test_trie_next_tokens_and_masks() -> None:
    trie = Trie(eos_id=EOS, bos_id=BOS, sequences=[[BOS, *a, EOS] for a in ANSWERS])
    assert len(trie) == len(ANSWERS)
    assert [BOS, 40, 41, EOS] in trie and [BOS, 41, EOS] not in trie
    assert trie.next_tokens([]) == [BOS]
    assert sorted(trie.next_tokens([BOS])) == [40, 50, 60]
    assert sorted(trie.next_tokens([BOS, 40])) == [EOS, 41, 42]
    assert trie.next_tokens([BOS, 40, 99]) == [EOS]  # left the trie: only eos, as the original
    assert trie.next_tokens([BOS, 40, 41, EOS]) == []

    mask = trie.constraint_mask([[BOS], [BOS, 40, 42]], VOCAB)
    assert mask.shape == (2, VOCAB) and mask.dtype == torch.bool
    assert mask[0].nonzero().flatten().tolist() == [40, 50, 60]
    assert mask[1].nonzero().flatten().tolist() == [43]

    # Teacher forcing: question tokens (unconstrained rows), then answer + eos.
    target = [7, 8, 40, 42, 43, EOS]
    tf = trie.teacher_forcing_mask(target, VOCAB, answer_start=2)
    assert tf[:2].all()
    assert [row.nonzero().flatten().tolist() for row in tf[2:]] == [[40, 50, 60], [EOS, 41, 42], [43], [EOS]]
    for t in range(2, len(target)):
        assert tf[t, target[t]]


def test_trie_from_answers_uses_bos_space_answer_eos() -> None:
    tokenizer = BiomedGPTTokenizer.default()
    trie = Trie.from_answers(["yes", "no", "left lung"], tokenizer)
    for answer in ("yes", "no", "left lung"):
        assert [tokenizer.bos_id, *tokenizer.encode(" " + answer), tokenizer.eos_id] in trie
    first = trie.next_tokens([tokenizer.bos_id])
    assert sorted(first) == sorted({tokenizer.encode(" " + a)[0] for a in ("yes", "no", "left lung")})


def test_decoding_config_validation() -> None:
    assert DecodingConfig().beam_size == 5
    bad = [
        dict(beam_size=0),
        dict(beam_size=2.0),
        dict(max_len_a=-1.0),
        dict(max_len_b=-1),
        dict(min_len=-1),
        dict(temperature=0.0),
        dict(no_repeat_ngram_size=-2),
        dict(len_penalty=float("nan")),
        dict(allowed_token_range=(2, 10)),
        dict(allowed_token_range=(100, 50)),
        dict(constraint_trie=Trie(sequences=[[BOS, 5, EOS]]), allowed_token_range=(10, 20)),
        dict(constraint_trie=[[BOS, 5, EOS]]),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            DecodingConfig(**kwargs)


def test_generate_rejects_inconsistent_lengths(trained_model: BiomedGPTForConditionalGeneration) -> None:
    ids = pad_rows(SOURCES[:1])
    with pytest.raises(ValueError, match="min_len"):
        generate(trained_model, ids, config=DecodingConfig(min_len=5, max_len_b=3))
    with pytest.raises(ValueError, match="prefix"):
        generate(trained_model, ids, config=DecodingConfig(max_len_b=2), prefix_tokens=[[5, 6, 7]])
    with pytest.raises(ValueError, match="eos"):
        generate(trained_model, ids, config=DecodingConfig(), prefix_tokens=[[5, EOS]])


# --------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("which", ["trained_model", "random_model"])
def test_greedy_cached_decoding_matches_uncached_reference(
    which: str, request: pytest.FixtureRequest, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """beam_size=1 with the KV cache == argmax decoding that recomputes the full prefix at each step."""
    model = request.getfixturevalue(which)
    patch_images, patch_masks = images
    ids = pad_rows(SOURCES)
    config = DecodingConfig(beam_size=1, max_len_b=12, min_len=0)
    hyps = generate(model, ids, patch_images=patch_images, patch_masks=patch_masks, config=config)
    lengths = []
    for i, sample_hyps in enumerate(hyps):
        assert len(sample_hyps) == 1
        (hyp,) = sample_hyps
        ref_tokens, ref_scores = reference_greedy(
            model, ids[i : i + 1], max_len=12, patch_images=patch_images[i : i + 1], patch_masks=patch_masks[i : i + 1]
        )
        assert hyp.tokens.tolist() == ref_tokens
        torch.testing.assert_close(hyp.positional_scores, torch.tensor(ref_scores), atol=1e-4, rtol=0)
        assert hyp.score == pytest.approx(sum(ref_scores) / len(ref_scores), abs=1e-4)
        lengths.append(len(ref_tokens))
    if which == "random_model":
        assert max(lengths) == 13  # ran to max_len (12 tokens + eos): many cached steps compared
    else:
        assert min(lengths) < 13  # the trained model stops by itself


@pytest.mark.parametrize("normalize", [False, True])
def test_beam_scores_are_recomputed_log_prob_sums(
    normalize: bool, trained_model: BiomedGPTForConditionalGeneration, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    patch_images, patch_masks = images
    ids = pad_rows(SOURCES)
    config = DecodingConfig(beam_size=4, max_len_b=10, len_penalty=0.7, normalize_scores=normalize)
    hyps = generate(trained_model, ids, patch_images=patch_images, patch_masks=patch_masks, config=config)
    seen_lengths = set()
    for i, sample_hyps in enumerate(hyps):
        assert len(sample_hyps) == 4
        scores = [h.score for h in sample_hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens.tolist()) for h in sample_hyps}) == 4
        for hyp in sample_hyps:
            tokens = hyp.tokens.tolist()
            assert tokens[-1] == EOS and EOS not in tokens[:-1] and BOS not in tokens
            ref = token_log_probs(
                trained_model, ids[i : i + 1], tokens, patch_images[i : i + 1], patch_masks[i : i + 1]
            )
            torch.testing.assert_close(hyp.positional_scores, ref, atol=1e-4, rtol=0)
            expected = float(ref.sum()) / (len(tokens) ** 0.7 if normalize else 1.0)
            assert hyp.score == pytest.approx(expected, abs=1e-4)
            seen_lengths.add(len(tokens))
    assert len(seen_lengths) > 1  # hypotheses were finalised at different steps


def test_beam_search_beats_or_equals_greedy_on_trained_model(trained_model: BiomedGPTForConditionalGeneration) -> None:
    """On this model the greedy path survives in the beam, so the beam's best unnormalised score is >= greedy's."""
    ids = pad_rows(SOURCES)
    greedy = generate(trained_model, ids, config=DecodingConfig(beam_size=1, normalize_scores=False))
    beam = generate(trained_model, ids, config=DecodingConfig(beam_size=5, normalize_scores=False))
    for g, b in zip(greedy, beam):
        assert b[0].score >= g[0].score - 1e-5
        assert any(h.tokens.tolist() == g[0].tokens.tolist() for h in b)


@pytest.mark.parametrize("beam_size", [len(ANSWERS), len(ANSWERS) + 2])
def test_trie_beam_search_enumerates_answers_and_agrees_with_candidate_scoring(
    beam_size: int, trained_model: BiomedGPTForConditionalGeneration, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """With beam >= #answers the constrained beam is exhaustive: it returns every answer with its exact score."""
    patch_images, patch_masks = images
    trie = Trie(sequences=[[BOS, *a, EOS] for a in ANSWERS])
    ids = pad_rows(SOURCES)
    config = DecodingConfig(beam_size=beam_size, normalize_scores=False, constraint_trie=trie)
    hyps = generate(trained_model, ids, patch_images=patch_images, patch_masks=patch_masks, config=config)
    brute = score_candidates(
        trained_model, ids, ANSWERS, patch_images=patch_images, patch_masks=patch_masks, constraint_trie=trie
    )
    assert brute.shape == (3, len(ANSWERS))
    for i, sample_hyps in enumerate(hyps):
        # A beam wider than the answer set returns only the finite (valid) hypotheses.
        assert all(math.isfinite(h.score) for h in sample_hyps)
        assert sorted(tuple(h.generated_tokens) for h in sample_hyps) == sorted(tuple(a) for a in ANSWERS)
        for hyp in sample_hyps:
            assert [BOS, *hyp.tokens.tolist()] in trie
            j = ANSWERS.index(hyp.generated_tokens)
            assert hyp.score == pytest.approx(float(brute[i, j]), abs=1e-4)
        assert sample_hyps[0].generated_tokens == ANSWERS[int(brute[i].argmax())]


def test_trie_outputs_always_in_trie_with_small_beams(trained_model: BiomedGPTForConditionalGeneration) -> None:
    trie = Trie(sequences=[[BOS, *a, EOS] for a in ANSWERS])
    ids = pad_rows(SOURCES)
    for beam_size, normalize in itertools.product([1, 2], [True, False]):
        config = DecodingConfig(beam_size=beam_size, normalize_scores=normalize, constraint_trie=trie)
        for sample_hyps in generate(trained_model, ids, config=config):
            assert len(sample_hyps) == beam_size
            assert all([BOS, *h.tokens.tolist()] in trie for h in sample_hyps)


def test_prefix_tokens_with_trie_like_vqa(
    trained_model: BiomedGPTForConditionalGeneration, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """VQA prompt_type=prev_output: question forced as decoder prefix, answer constrained by the trie."""
    patch_images, patch_masks = images
    trie = Trie(sequences=[[BOS, *a, EOS] for a in ANSWERS])
    ids = pad_rows(SOURCES)
    prefixes = [[70, 71, 72], [73], [74, 75]]
    prefix_tensor = pad_rows(prefixes)  # right-padded with pad, as the original collater
    brute = score_candidates(
        trained_model,
        ids,
        ANSWERS,
        patch_images=patch_images,
        patch_masks=patch_masks,
        constraint_trie=trie,
        prefix_tokens=prefix_tensor,
        chunk_size=2,
    )
    for beam_size in (1, len(ANSWERS)):
        config = DecodingConfig(beam_size=beam_size, normalize_scores=False, constraint_trie=trie)
        hyps = generate(
            trained_model,
            ids,
            patch_images=patch_images,
            patch_masks=patch_masks,
            config=config,
            prefix_tokens=prefix_tensor,
        )
        for i, sample_hyps in enumerate(hyps):
            assert len(sample_hyps) == beam_size
            for hyp in sample_hyps:
                tokens = hyp.tokens.tolist()
                assert hyp.prefix_len == len(prefixes[i])
                assert tokens[: hyp.prefix_len] == prefixes[i]
                assert hyp.generated_tokens in ANSWERS
                # The score includes the forced prefix; without it, it is the candidate's teacher-forced score.
                ref = token_log_probs(
                    trained_model,
                    ids[i : i + 1],
                    tokens,
                    patch_images[i : i + 1],
                    patch_masks[i : i + 1],
                    trie=trie,
                    answer_start=hyp.prefix_len,
                )
                torch.testing.assert_close(hyp.positional_scores, ref, atol=1e-4, rtol=0)
                answer_score = hyp.score - float(hyp.positional_scores[: hyp.prefix_len].sum())
                assert answer_score == pytest.approx(float(brute[i, ANSWERS.index(hyp.generated_tokens)]), abs=1e-4)
            if beam_size == len(ANSWERS):
                assert sample_hyps[0].generated_tokens == ANSWERS[int(brute[i].argmax())]


def test_forced_prefix_without_trie_and_list_form(trained_model: BiomedGPTForConditionalGeneration) -> None:
    ids = pad_rows(SOURCES)
    prefixes = [[70, 71], [72, 73, 74, 75], [76]]
    config = DecodingConfig(beam_size=3, max_len_b=8)
    from_lists = generate(trained_model, ids, config=config, prefix_tokens=prefixes)
    from_tensor = generate(trained_model, ids, config=config, prefix_tokens=pad_rows(prefixes))
    for i, (a, b) in enumerate(zip(from_lists, from_tensor)):
        assert [h.tokens.tolist() for h in a] == [h.tokens.tolist() for h in b]
        for hyp in a:  # every beam carries the exact prefix, not only the best one
            assert hyp.tokens.tolist()[: len(prefixes[i])] == prefixes[i]
            assert len(hyp.tokens) - 1 <= 8


def test_no_repeat_ngram_blocking(random_model: BiomedGPTForConditionalGeneration) -> None:
    ids = pad_rows(SOURCES)
    free = generate(random_model, ids, config=DecodingConfig(beam_size=3, max_len_b=12))
    assert any(repeated_bigrams([BOS, *h.tokens.tolist()]) for hs in free for h in hs)  # the model does repeat
    blocked = generate(random_model, ids, config=DecodingConfig(beam_size=3, max_len_b=12, no_repeat_ngram_size=2))
    for sample_hyps in blocked:
        assert len(sample_hyps) == 3
        for hyp in sample_hyps:
            assert not repeated_bigrams([BOS, *hyp.tokens.tolist()])


def test_min_len_and_max_len(trained_model: BiomedGPTForConditionalGeneration) -> None:
    ids = pad_rows(SOURCES)  # width 6
    short = generate(trained_model, ids, config=DecodingConfig(beam_size=3, min_len=1))
    assert min(len(h.tokens) - 1 for hs in short for h in hs) < 5  # without min_len some stop early
    long = generate(trained_model, ids, config=DecodingConfig(beam_size=3, min_len=5))
    assert all(len(h.tokens) - 1 >= 5 for hs in long for h in hs)

    capped = generate(trained_model, ids, config=DecodingConfig(beam_size=3, max_len_b=2))
    assert max(len(h.tokens) - 1 for hs in capped for h in hs) == 2
    assert all(h.tokens[-1] == EOS for hs in capped for h in hs)
    # max_len = int(a * src_len + b) with src_len the padded text width: int(0.5 * 6 + 0) = 3.
    scaled = generate(trained_model, ids, config=DecodingConfig(beam_size=3, max_len_a=0.5, max_len_b=0))
    assert max(len(h.tokens) - 1 for hs in scaled for h in hs) == 3


def test_allowed_token_range_and_code_generation(random_model: BiomedGPTForConditionalGeneration) -> None:
    ids = pad_rows(SOURCES)
    ranged = generate(
        random_model, ids, config=DecodingConfig(beam_size=2, max_len_b=6, min_len=4, allowed_token_range=(200, 300))
    )
    for hyp in (h for hs in ranged for h in hs):  # as the original, specials (< 4) stay allowed
        assert all(t < 4 or 200 <= t < 300 for t in hyp.tokens[:-1].tolist())
        assert torch.isfinite(hyp.positional_scores).all()
    codes = generate(
        random_model, ids, config=DecodingConfig(beam_size=2, max_len_b=5, gen_code=True, allowed_token_range=(5, 8197))
    )
    for hyp in (h for hs in codes for h in hs):
        assert len(hyp.tokens) == 6 and hyp.tokens[-1] == EOS  # specials (eos too) are barred until max_len
        assert all(5 <= t < 8197 for t in hyp.tokens[:-1].tolist())


def test_batch_equals_single_samples_and_masked_image_equals_text_only(
    trained_model: BiomedGPTForConditionalGeneration, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    patch_images, patch_masks = images  # sample 1 has patch_mask False
    ids = pad_rows(SOURCES)
    config = DecodingConfig(beam_size=3, max_len_b=8, normalize_scores=False)
    batched = generate(trained_model, ids, patch_images=patch_images, patch_masks=patch_masks, config=config)
    for i in range(3):
        alone_ids = torch.tensor([SOURCES[i]])  # unpadded
        if patch_masks[i]:
            alone = generate(trained_model, alone_ids, patch_images=patch_images[i : i + 1], config=config)
        else:  # a sample whose image is masked out behaves as text-only input
            alone = generate(trained_model, alone_ids, patch_images=None, config=config)
        assert [h.tokens.tolist() for h in batched[i]] == [h.tokens.tolist() for h in alone[0]]
        for a, b in zip(batched[i], alone[0]):
            assert a.score == pytest.approx(b.score, abs=1e-4)
    # The image matters for the samples that have one.
    text_only = generate(trained_model, ids, config=config)
    assert any(abs(a[0].score - b[0].score) > 1e-3 for a, b, m in zip(batched, text_only, patch_masks.tolist()) if m)
    assert batched[1][0].score == pytest.approx(text_only[1][0].score, abs=1e-4)


def test_generate_restores_training_mode_and_holds_no_gradients(
    trained_model: BiomedGPTForConditionalGeneration,
) -> None:
    trained_model.train()
    try:
        hyps = generate(trained_model, pad_rows(SOURCES), config=DecodingConfig(beam_size=2, max_len_b=4))
        assert trained_model.training
    finally:
        trained_model.eval()
    hyp: Hypothesis = hyps[0][0]
    assert not hyp.positional_scores.requires_grad
    assert torch.is_grad_enabled()  # no_grad was scoped to the call


# --------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("use_trie", [False, True])
def test_score_candidates_matches_manual_forward(
    use_trie: bool, trained_model: BiomedGPTForConditionalGeneration, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    patch_images, patch_masks = images
    ids = pad_rows(SOURCES)
    trie = Trie(sequences=[[BOS, *a, EOS] for a in ANSWERS]) if use_trie else None
    per_sample = [ANSWERS[:2], ANSWERS, [[60, 61, 62], [99, 98], [50]]]  # [99, 98] is outside the trie
    scores = score_candidates(
        trained_model,
        ids,
        per_sample,
        patch_images=patch_images,
        patch_masks=patch_masks,
        chunk_size=2,
        constraint_trie=trie,
        prefix_tokens=[[70], [], [71, 72]],
    )
    assert scores.shape == (3, len(ANSWERS)) and scores.dtype == torch.float32
    assert torch.isinf(scores[0, 2:]).all()  # sample 0 has only two candidates
    prefixes = [[70], [], [71, 72]]
    for i, cands in enumerate(per_sample):
        for j, cand in enumerate(cands):
            target = prefixes[i] + cand + [EOS]
            ref = token_log_probs(
                trained_model,
                ids[i : i + 1],
                target,
                patch_images[i : i + 1],
                patch_masks[i : i + 1],
                trie=trie,
                answer_start=len(prefixes[i]),
            )[len(prefixes[i]) :].sum()
            if use_trie and cand == [99, 98]:
                assert scores[i, j] == float("-inf") and ref == float("-inf")
            else:
                assert float(scores[i, j]) == pytest.approx(float(ref), abs=1e-4)
                assert scores[i, j] < 0


def test_score_candidates_text_only_shared_candidates(trained_model: BiomedGPTForConditionalGeneration) -> None:
    """The trained model prefers its own targets; one chunk or many gives the same numbers."""
    ids = pad_rows(SOURCES)
    one_chunk = score_candidates(trained_model, ids, ANSWERS)
    many_chunks = score_candidates(trained_model, ids, ANSWERS, chunk_size=1)
    torch.testing.assert_close(one_chunk, many_chunks, atol=1e-5, rtol=0)
    for i, targets in enumerate(TARGETS):
        best = ANSWERS[int(one_chunk[i].argmax())]
        assert best in targets


def test_model_generate_takes_transformers_arguments(trained_model, images):
    """model.generate maps transformers' argument names onto the fairseq search and returns its tensor layout."""
    source = pad_rows(SOURCES)
    patch_images, patch_masks = images
    config = trained_model.config
    sequences = trained_model.generate(
        source, None, patch_images, patch_masks, num_beams=3, max_new_tokens=6, num_return_sequences=2
    )
    # max_new_tokens counts eos (fairseq's max_len does not): max_len_b = 5.
    hypotheses = generate(
        trained_model, source, patch_images, patch_masks, config=DecodingConfig(beam_size=3, max_len_b=5)
    )
    expected = [[config.decoder_start_token_id, *h.tokens.tolist()] for sample in hypotheses for h in sample[:2]]
    assert sequences.shape[0] == 2 * len(SOURCES) and sequences.shape[1] <= 1 + 6
    for row, want in zip(sequences.tolist(), expected, strict=True):
        assert row[: len(want)] == want
        assert all(token == config.pad_token_id for token in row[len(want) :])
    with pytest.raises(ValueError, match="no sampling"):
        trained_model.generate(source, do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences=4 must be between 1 and num_beams=3"):
        trained_model.generate(source, num_beams=3, num_return_sequences=4)
    with pytest.raises(ValueError, match="min_new_tokens=1 must be below max_new_tokens=1"):
        trained_model.generate(source, max_new_tokens=1)
