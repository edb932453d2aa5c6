"""Tests for biomedgpt.evaluation.metrics: hand-derived values (derivations in the comments) and differential tests
against pycocoevalcap / rouge-score called directly on seeded random corpora."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score.rouge_scorer import RougeScorer

from biomedgpt.evaluation import (
    accuracy,
    bioclean,
    caption_metrics,
    fix_tokenization,
    postprocess_summary,
    rouge_scores,
    summary_metrics,
    vqa_accuracy,
)

TOL = 1e-9
PENALTY_1 = math.exp(-1 / 72)  # Gaussian length penalty for |delta| = 1 with sigma = 6: exp(-1 / (2 * 36))


# ----------------------------------------------------------------------------------------------------------------------
# VQA and accuracy
# ----------------------------------------------------------------------------------------------------------------------

VQA_REFS = {
    "q1": "yes",
    "q2": "no",
    "q3": "left lung",
    "q4": "mri",
    "q5": {"ct": 1.0, "Computed Tomography": 0.5},
    "q6": "left",  # a closed choice question ("left or right?") that is not yes/no
}
VQA_PREDS = {
    "q1": " Yes ",  # strip/lower -> "yes": 1
    "q2": "no",  # 1
    "q3": "left lung",  # 1
    "q4": "ct",  # 0
    "q5": "computed tomography",  # matches the normalised key with confidence 0.5
    "q6": "left",  # 1
}
VQA_TYPES = {"q1": "CLOSED", "q2": "closed", "q3": "OPEN", "q4": "OPEN", "q5": "OPEN", "q6": "CLOSED"}


def test_vqa_accuracy_with_given_answer_types() -> None:
    result = vqa_accuracy(VQA_PREDS, VQA_REFS, VQA_TYPES)
    # overall: (1 + 1 + 1 + 0 + 0.5 + 1) / 6 = 4.5 / 6 = 0.75
    assert result["accuracy"] == pytest.approx(0.75, abs=TOL)
    assert result["count"] == 6
    # closed q1, q2, q6: 3 / 3 ; open q3, q4, q5: (1 + 0 + 0.5) / 3 = 0.5
    assert result["closed_accuracy"] == pytest.approx(1.0, abs=TOL)
    assert result["closed_count"] == 3
    assert result["open_accuracy"] == pytest.approx(0.5, abs=TOL)
    assert result["open_count"] == 3
    assert result["num_missing"] == 0
    assert result["answer_type_source"] == "given"


def test_vqa_accuracy_yes_no_heuristic_without_answer_types() -> None:
    result = vqa_accuracy(VQA_PREDS, VQA_REFS)
    # heuristic: only q1, q2 (yes/no references) are CLOSED; q6 "left" becomes OPEN
    # closed: 2 / 2 = 1 ; open q3..q6: (1 + 0 + 0.5 + 1) / 4 = 0.625 ; overall unchanged 0.75
    assert result["closed_accuracy"] == pytest.approx(1.0, abs=TOL)
    assert result["closed_count"] == 2
    assert result["open_accuracy"] == pytest.approx(0.625, abs=TOL)
    assert result["open_count"] == 4
    assert result["accuracy"] == pytest.approx(0.75, abs=TOL)
    assert result["answer_type_source"] == "yes/no heuristic"


def test_vqa_accuracy_missing_prediction_and_empty_split() -> None:
    # q2 unanswered -> 0 ; q1 wrong -> 0 ; no OPEN question -> open accuracy None
    result = vqa_accuracy({"q1": "no"}, {"q1": "yes", "q2": "no"})
    assert result["accuracy"] == 0.0
    assert result["num_missing"] == 1
    assert result["open_accuracy"] is None and result["open_count"] == 0
    # an empty prediction never matches
    assert vqa_accuracy({"q1": ""}, {"q1": "yes"})["accuracy"] == 0.0


def test_vqa_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no reference"):
        vqa_accuracy({"zz": "yes"}, {"q1": "yes"})
    with pytest.raises(ValueError, match="CLOSED or OPEN"):
        vqa_accuracy({"q1": "yes"}, {"q1": "yes"}, {"q1": "yes/no"})
    with pytest.raises(ValueError, match="no answer type"):
        vqa_accuracy({"q1": "yes"}, {"q1": "yes"}, {})


def test_accuracy() -> None:
    # "yes" == "yes", "No " -> "no" == "no", "maybe" != "no": 2 / 3
    assert accuracy(["yes", "No ", "maybe"], ["yes", "no", "no"]) == pytest.approx(2 / 3, abs=TOL)
    assert accuracy(["No"], ["no"], normalize=False) == 0.0
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


# ----------------------------------------------------------------------------------------------------------------------
# captioning
# ----------------------------------------------------------------------------------------------------------------------


def test_bioclean_matches_original_character_set() -> None:
    # quotes and '/' deleted, strip, lower, then . , ( ) % ! deleted; '-' survives; nothing becomes a space
    assert bioclean(' "Left-sided" pleural effusion, (R/L) 50%! ') == "left-sided pleural effusion rl 50"
    # the original's ':-\[' range also deletes < = > @ ; '#', '$', '~' survive
    assert bioclean("a<b>=c@d #e $f ~g") == "abcd #e $f ~g"
    # quotes go before strip(), other punctuation after: the trailing '.' leaves a trailing space
    assert bioclean('" a ."') == "a "
    # non-ASCII letters are kept and lowercased
    assert bioclean("Café Ünïcödé.") == "café ünïcödé"


def _cider(candidates: dict, references: dict) -> float:
    return caption_metrics(candidates, references, clean=False)["cider"]


def _rouge_l(candidate: str, references: list[str]) -> float:
    return caption_metrics({0: candidate}, {0: references}, clean=False)["rouge_l"]


def test_cider_d_two_image_toy_corpus() -> None:
    # Corpus df (N = 2 images, log N = log 2 =: w).  Image A refs: "a black cat", "a cat"; image B ref: "a dog".
    # "a" occurs in both documents: idf = log 2 - log 2 = 0.  Every other n-gram (also unseen ones, df -> 1) has
    # weight tf * w, so w cancels in every cosine.
    #
    # A, hyp "a cat": 1-grams {a: 0, cat: w}, 2-grams {"a cat": w}, none longer; length = #bigrams = 1.
    #   vs "a black cat" (bigrams: 2, delta = -1):
    #     n=1: ref {a: 0, black: w, cat: w}, |ref| = w*sqrt2; clipped dot = min(w, w) * w = w^2 -> 1/sqrt2
    #     n=2: ref {"a black", "black cat"}: dot 0 -> 0 ; n=3,4: hyp norm 0 -> 0
    #     times penalty exp(-1/72)  ->  [e/sqrt2, 0, 0, 0]        (e := exp(-1/72))
    #   vs "a cat" (identical, delta 0): n=1 -> 1, n=2 -> 1, n=3,4 -> 0  ->  [1, 1, 0, 0]
    #   score = 10 * mean_n(sum over refs) / #refs = 10 * ((1 + e/sqrt2) + 1) / 4 / 2 = 1.25 * (2 + e/sqrt2)
    # B, hyp "a dog runs" vs "a dog" (bigrams 2 vs 1, delta = 1):
    #     n=1: hyp {a: 0, dog: w, runs: w} |h| = w*sqrt2, ref {a: 0, dog: w} |r| = w: w^2 / (w^2 sqrt2) = 1/sqrt2
    #     n=2: hyp {"a dog": w, "dog runs": w}, ref {"a dog": w}: 1/sqrt2 ; n=3: ref norm 0 -> 0 ; n=4: 0
    #   score = 10 * (2 * e/sqrt2) / 4 = 5 * e / sqrt2
    # corpus CIDEr-D = mean of the two (no x100)
    candidates = {"A": "a cat", "B": "a dog runs"}
    references = {"A": ["a black cat", "a cat"], "B": ["a dog"]}
    expected = (1.25 * (2 + PENALTY_1 / math.sqrt(2)) + 5 * PENALTY_1 / math.sqrt(2)) / 2
    assert _cider(candidates, references) == pytest.approx(expected, abs=1e-9)
    assert _cider(candidates, references) == pytest.approx(3.4292304372, abs=1e-9)


def test_cider_d_clipping() -> None:
    # N = 2, w = log 2.  Item 0: hyp "cat cat" {cat: 2w}, ref "cat" {cat: w}:
    #   n=1 clipped dot = min(2w, w) * w = w^2, norms 2w * w -> 1/2 (unclipped it would be 2w^2 / 2w^2 = 1)
    #   n=2: ref has no bigram -> 0 ; lengths 1 vs 0 bigrams -> penalty e  => 10 * (e / 2) / 4 = 1.25 e
    # Item 1: "dog" vs "dog": n=1 -> 1, rest 0, delta 0 => 10 * 1 / 4 = 2.5
    assert _cider({0: "cat cat", 1: "dog"}, {0: ["cat"], 1: ["dog"]}) == pytest.approx(
        (1.25 * PENALTY_1 + 2.5) / 2, abs=1e-9
    )


def test_cider_d_identical_empty_and_one_image() -> None:
    # distinct 4-word captions, each identical to its reference: every n-gram has df 1, all cosines 1, delta 0
    # -> 10 * 4/4 = 10, the maximum
    assert _cider({1: "a b c d", 2: "e f g h"}, {1: ["a b c d"], 2: ["e f g h"]}) == pytest.approx(10.0)
    # empty hypothesis: zero norm -> 0 for item 1, 10 for item 2 -> mean 5 (no NaN)
    assert _cider({1: "", 2: "e f g h"}, {1: ["a b c d"], 2: ["e f g h"]}) == pytest.approx(5.0)
    # a one-image corpus has log N = 0, so every weight is 0 -> CIDEr-D 0
    assert _cider({0: "a cat"}, {0: ["a cat"]}) == 0.0


def test_caption_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ"):
        caption_metrics({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="no items"):
        caption_metrics({}, {})
    with pytest.raises(ValueError, match="references of 1 must be a string or a non-empty list"):
        caption_metrics({1: "a"}, {1: []})
    with pytest.raises(ValueError, match="references of 1 must be"):
        caption_metrics({1: "a"}, {1: [None]})
    with pytest.raises(ValueError, match="candidate of 1 must be a string"):
        caption_metrics({1: None}, {1: "a"})
    # "..." cleans to "": no reference n-gram at all, which the library cannot score
    with pytest.raises(ValueError, match="every reference caption is empty"):
        caption_metrics({1: "a", 2: "b"}, {1: "...", 2: ["", "!"]})


def test_rouge_l_pycocoevalcap() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5; P = R = 5/6 -> F = 5/6
    assert _rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6, abs=TOL)
    # P = 2/2 = 1, R = 2/6; F = (1 + 1.44) * 1 * (1/3) / (1/3 + 1.44 * 1) = 2.44 / 5.32   (beta = 1.2)
    assert _rouge_l("the cat", ["the cat sat on the mat"]) == pytest.approx(2.44 / 5.32, abs=TOL)
    # P and R are maximised independently: ref1 gives P = 3/3 (R = 3/6), ref2 "a" gives R = 1/1 (P = 1/3)
    # -> F(1, 1) = 1, although the best single-reference F is 2.44 * 0.5 / (0.5 + 1.44) = 0.629
    assert _rouge_l("a b c", ["a b c d e f", "a"]) == pytest.approx(1.0, abs=TOL)
    assert _rouge_l("", ["a b"]) == 0.0
    # split(" "): the double space is an empty token, "a  b" has 3 tokens, LCS with "a b" is 2
    # P = 2/3, R = 1 -> 2.44 * (2/3) / (1 + 1.44 * 2/3) = (4.88/3) / 1.96
    assert _rouge_l("a  b", ["a b"]) == pytest.approx(4.88 / 5.88, abs=TOL)


def test_caption_metrics_after_bioclean() -> None:
    # after bioclean the corpus is exactly the toy corpus of test_cider_d_two_image_toy_corpus
    candidates = {"A": "A Cat.", "B": "a dog runs!"}
    references = {"A": ["A black cat!", "a (cat)"], "B": "A dog."}
    result = caption_metrics(candidates, references)
    expected_cider = (1.25 * (2 + PENALTY_1 / math.sqrt(2)) + 5 * PENALTY_1 / math.sqrt(2)) / 2
    assert result["cider"] == pytest.approx(expected_cider, abs=1e-9)
    # ROUGE-L: A "a cat" equals ref 2 -> 1 ; B "a dog runs" vs "a dog": P = 2/3, R = 1 -> 4.88 / 5.88
    assert result["rouge_l"] == pytest.approx((1 + 4.88 / 5.88) / 2, abs=TOL)
    # without cleaning "cat." != "cat" and scores drop
    assert caption_metrics(candidates, references, clean=False)["rouge_l"] < result["rouge_l"]


# ----------------------------------------------------------------------------------------------------------------------
# differential tests against the libraries on random corpora
# ----------------------------------------------------------------------------------------------------------------------

# inflected forms (so stemming matters), numbers, capitals and punctuation that bioclean / rouge-score treat specially
_VOCABULARY = (
    "the a of in with no is are was were left right lung lungs pleural effusion effusions opacity opacities "
    "consolidation consolidated heart cardiac enlarged enlargement normal abnormal abnormality mild moderate severe "
    "showing shows shown fracture fractured fractures lesion lesions mass masses nodular nodule nodules running "
    "generalization generalized relational conditional hopefulness adoption controlling radically dying skies "
    "Type CT MRI X-ray Café naïve don't it's 1 10 1,000 3.5 2nd 50%"
)
_WORDS = _VOCABULARY.split()
_PUNCT = list(".,?;:!()[]{}\"'/-%&#$@<>=*_+~`|")


def _random_text(rng: random.Random, base: str | None = None) -> str:
    if base is not None and rng.random() < 0.7:  # a perturbed copy of the base text, so that n-grams overlap
        return " ".join(
            word if rng.random() < 0.7 else rng.choice(_WORDS) for word in base.split() if rng.random() < 0.9
        )
    length = rng.choice([0, 1, 2, 30]) if rng.random() < 0.15 else rng.randint(3, 20)
    words = []
    for _ in range(length):
        word = words[-1] if words and rng.random() < 0.15 else rng.choice(_WORDS)  # repeated words
        if rng.random() < 0.2:
            word = word.upper() if rng.random() < 0.5 else word.capitalize()
        if rng.random() < 0.15:
            word += rng.choice(_PUNCT)
        if rng.random() < 0.08:
            word = rng.choice(_PUNCT) + " " + word
        words.append(word)
    return ("  " if rng.random() < 0.05 else " ").join(words)


def _random_caption_corpus(seed: int, size: int) -> tuple[dict[str, str], dict[str, str | list[str]]]:
    rng = random.Random(seed)
    candidates: dict[str, str] = {}
    references: dict[str, str | list[str]] = {}
    for i in range(size):
        base = _random_text(rng)
        count = rng.randint(1, 5)
        refs = [_random_text(rng, base) for _ in range(count)]
        key = f"img{i}"
        references[key] = refs[0] if count == 1 and rng.random() < 0.5 else refs  # the original's single string
        candidates[key] = _random_text(rng, base)
    return candidates, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_caption_metrics_equal_pycocoevalcap_on_random_corpora(seed: int) -> None:
    candidates, references = _random_caption_corpus(seed, 300)
    # the library the documented way (pycocoevalcap/eval.py, with bioclean in place of the PTB tokenizer)
    gts = {k: [bioclean(v)] if isinstance(v, str) else [bioclean(r) for r in v] for k, v in references.items()}
    scorer = CiderScorer(n=4, sigma=6.0)
    for key in gts:
        scorer += (bioclean(candidates[key]), gts[key])
    cider, _ = scorer.compute_score()
    rouge = Rouge()
    rouge_l = statistics.fmean(rouge.calc_score([bioclean(candidates[k])], gts[k]) for k in gts)

    result = caption_metrics(candidates, references)
    assert result["cider"] == pytest.approx(cider, rel=1e-12, abs=1e-12)
    assert result["rouge_l"] == pytest.approx(rouge_l, rel=1e-12, abs=1e-12)
    # the corpora are not degenerate: scores are neither 0 nor perfect
    assert 0.1 < result["cider"] < 5 and 0.1 < result["rouge_l"] < 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_metrics_equal_rouge_score_on_random_corpora(seed: int) -> None:
    rng = random.Random(100 + seed)
    predictions = [_random_text(rng) for _ in range(300)]
    references = [_random_text(rng, p) for p in predictions]
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [scorer.score(r.lower(), postprocess_summary(p)) for p, r in zip(predictions, references)]
    expected = {key: statistics.fmean(pair[key].fmeasure for pair in pairs) for key in ("rouge1", "rouge2", "rougeL")}
    result = summary_metrics(predictions, references)
    assert result == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert all(0.1 < value < 0.95 for value in result.values())
    # the options reach the scorer: no stemming, no 1 -> # masking
    plain = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = [plain.score(r.lower(), postprocess_summary(p, False)) for p, r in zip(predictions, references)]
    unstemmed = summary_metrics(predictions, references, replace_one_with_hash=False, use_stemmer=False)
    assert unstemmed == pytest.approx(
        {key: statistics.fmean(pair[key].fmeasure for pair in pairs) for key in unstemmed}, rel=1e-12, abs=1e-12
    )


# ----------------------------------------------------------------------------------------------------------------------
# summarization
# ----------------------------------------------------------------------------------------------------------------------


def test_rouge_tokenization_unicode_punctuation_and_stemming() -> None:
    # rouge-score: lower, runs of non [a-z0-9] -> space: "café" -> "caf", "naïve" -> "na ve", "x-ray's" -> "x ray s"
    assert rouge_scores(["Café—naïve  X-ray's 2nd!"], ["caf na ve x ray s 2nd"], use_stemmer=False)["rouge2"] == 1.0
    # Porter stems: relational/relate -> relat, conditional/condition -> condit; unstemmed nothing matches
    assert rouge_scores(["relational conditional"], ["relate condition"])["rouge2"] == 1.0
    assert rouge_scores(["relational conditional"], ["relate condition"], use_stemmer=False)["rouge1"] == 0.0
    # only tokens longer than 3 characters are stemmed: "does" -> "doe", "was" stays (not "wa")
    assert rouge_scores(["does was"], ["doe was"])["rouge1"] == 1.0
    assert rouge_scores(["?!"], ["some text"])["rouge1"] == 0.0


def test_rouge_n_and_l_hand_computed() -> None:
    # pair 1: unigrams {the: 2, cat, sat, on, mat} vs {the: 2, cat, is, on, mat}: overlap 5 of 6 each -> F 5/6
    #   bigrams: 5 each, common {the cat, on the, the mat} = 3 -> 3/5 ; LCS 5 -> 5/6 (balanced F1, not beta 1.2)
    # pair 2 "the cat" vs "the cat sat on the mat": rouge1 P = 1, R = 1/3 -> 0.5 ; rouge2 1/1 vs 1/5 -> 2*0.2/1.2
    #   = 1/3 ; rougeL LCS 2 -> 0.5.   Corpus values: plain means of the per-pair F-measures.
    corpus = rouge_scores(["the cat sat on the mat", "the cat"], ["the cat is on the mat", "the cat sat on the mat"])
    assert corpus["rouge1"] == pytest.approx((5 / 6 + 0.5) / 2, abs=TOL)
    assert corpus["rouge2"] == pytest.approx((0.6 + 1 / 3) / 2, abs=TOL)
    assert corpus["rougeL"] == pytest.approx((5 / 6 + 0.5) / 2, abs=TOL)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_scores(["a"], ["a", "b"])


def test_rouge_stemming_identical_and_empty() -> None:
    # stemmed: [the, cat, were, run] vs [the, cat, run]: overlap 3, P = 3/4, R = 1 -> F = 1.5 / 1.75 = 6/7
    assert rouge_scores(["The cats were running"], ["the cat runs"])["rouge1"] == pytest.approx(6 / 7, abs=TOL)
    # unstemmed: [the, cats, were, running] vs [the, cat, runs]: overlap 1, P = 1/4, R = 1/3 -> F = 2/7
    unstemmed = rouge_scores(["The cats were running"], ["the cat runs"], use_stemmer=False)
    assert unstemmed["rouge1"] == pytest.approx(2 / 7, abs=TOL)
    assert rouge_scores(["Same text, here."], ["same text here"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores([""], ["some text"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_fix_tokenization() -> None:
    text = "he said \" hi \" ( ok ) don ' t it ' s 3 , 000 3 . 5 . . . a - b"
    assert fix_tokenization(text) == "he said `` hi '' -lrb- ok -rrb- do n't it 's 3,000 3.5 ... a-b"
    assert fix_tokenization("a & b < c") == "a &amp; b &lt; c"
    assert fix_tokenization("' quoted ' -- x -") == "` quoted ' -- x -"


def test_summary_metrics_gigaword_postprocessing() -> None:
    # lower -> "what is ( type 1 ) diabetes ?" -> fix_tokenization -> "what is -lrb- type 1 -rrb- diabetes ?"
    # -> 1 -> # : "what is -lrb- type # -rrb- diabetes ?"
    assert postprocess_summary("What is ( type 1 ) diabetes ?") == "what is -lrb- type # -rrb- diabetes ?"
    assert postprocess_summary("Type 1", replace_one_with_hash=False) == "type 1"
    result = summary_metrics(["What is ( type 1 ) diabetes ?"], ["what is type 1 diabetes?"])
    # hyp tokens [what, is, lrb, type, rrb, diabet] (6), ref [what, is, type, 1, diabet] (5)
    # rouge1: overlap 4: P = 4/6, R = 4/5 -> 2 * (2/3) * (4/5) / (2/3 + 4/5) = 8/11
    # rouge2: hyp 5 bigrams, ref 4, common "what is" -> P = 1/5, R = 1/4 -> 2/9 ; rougeL: LCS 4 -> 8/11
    assert result["rouge1"] == pytest.approx(8 / 11, abs=TOL)
    assert result["rouge2"] == pytest.approx(2 / 9, abs=TOL)
    assert result["rougeL"] == pytest.approx(8 / 11, abs=TOL)


def test_summary_metrics_one_to_hash_flag() -> None:
    # default (original): "type # diabetes" -> [type, diabet] vs [type, 1, diabet]:
    # rouge1 P = 1, R = 2/3 -> 0.8 ; rouge2: (type diabet) vs {(type 1), (1 diabet)} -> 0 ; rougeL: LCS 2 -> 0.8
    default = summary_metrics(["Type 1 diabetes"], ["type 1 diabetes"])
    assert default == pytest.approx({"rouge1": 0.8, "rouge2": 0.0, "rougeL": 0.8}, abs=TOL)
    assert summary_metrics(["Type 1 diabetes"], ["type 1 diabetes"], replace_one_with_hash=False) == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
