"""Task metrics of the BiomedGPT evaluation, re-implemented without third-party metric packages.

Every function reproduces the scorer the original code used (spec §6.2/§6.3), including its quirks, so numbers are
comparable with published ones; deliberate differences are listed in the docstrings ("Differences").

- VQA (VQA-RAD/SLAKE/PathVQA): :func:`vqa_accuracy`; original ``ref_dict.get(pred, 0)`` (``vqa_score``).
- captioning: :func:`caption_metrics` (:func:`bioclean`, :func:`caption_cider_d`, :func:`rouge_l`); original
  ``scripts/caption/metric_caption.py`` with pycocoevalcap CIDEr(-D) and ROUGE-L.
- summarization (MeQSum): :func:`summary_metrics` (:func:`postprocess_summary`, :func:`rouge_scores`); original HF
  ``datasets`` ROUGE (rouge-score) with Porter stemming after Gigaword post-processing.
- NLI / classification: :func:`accuracy`; exact match of the argmax label.

All scores are fractions (ROUGE in [0, 1], CIDEr-D on pycocoevalcap's scale where 1.227 is the "122.7" of papers).
"""

from __future__ import annotations

import math
import pickle
import re
import string
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DocumentFrequency",
    "PorterStemmer",
    "RougeScore",
    "accuracy",
    "bioclean",
    "caption_cider_d",
    "caption_metrics",
    "cider_d_scores",
    "compute_document_frequency",
    "fix_tokenization",
    "load_document_frequency",
    "postprocess_summary",
    "rouge_l",
    "rouge_score_pair",
    "rouge_scores",
    "rouge_tokenize",
    "summary_metrics",
    "vqa_accuracy",
]

Ngram = tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------------------


def _normalize_answer(text: str) -> str:
    return text.strip().lower()


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _check_same_keys(candidates: Mapping[Any, Any], references: Mapping[Any, Any]) -> None:
    # pycocoevalcap asserts equal key sets; a silent intersection would hide id mismatches.
    if set(candidates) != set(references):
        missing = len(set(references) - set(candidates))
        extra = len(set(candidates) - set(references))
        raise ValueError(f"candidate and reference ids differ ({missing} without candidate, {extra} without reference)")
    if not references:
        raise ValueError("no items to evaluate")


# ----------------------------------------------------------------------------------------------------------------------
# VQA / classification
# ----------------------------------------------------------------------------------------------------------------------

CLOSED = "CLOSED"
OPEN = "OPEN"
_YES_NO = frozenset({"yes", "no"})


def _reference_confidences(reference: Mapping[str, float] | str) -> dict[str, float]:
    if isinstance(reference, str):
        return {_normalize_answer(reference): 1.0}
    confidences: dict[str, float] = {}
    for answer, confidence in reference.items():
        key = _normalize_answer(answer)
        confidences[key] = max(confidences.get(key, 0.0), float(confidence))
    return confidences


def _heuristic_answer_type(confidences: Mapping[str, float]) -> str:
    answers = [answer for answer, confidence in confidences.items() if confidence > 0]
    return CLOSED if answers and all(answer in _YES_NO for answer in answers) else OPEN


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Mapping[str, float] | str],
    answer_types: Mapping[Hashable, str] | None = None,
) -> dict[str, Any]:
    """VQA score: mean reference confidence of the predicted answer, overall and split into closed / open questions.

    The per-question score is the original's ``ref_dict.get(pred, 0)``: with VQA-RAD/SLAKE/PathVQA confidences of 1
    this is exact-match accuracy. Predictions and reference answers are normalised by ``strip().lower()`` (the
    original compares the stripped decoded string to already-lowercased answers, so this only matters for external
    predictions); if two reference answers normalise to the same string the larger confidence is kept.

    The original does not compute the closed/open split (BiomedGPT issue #77). With ``answer_types`` (question id ->
    ``"CLOSED"``/``"OPEN"``, case-insensitive; the datasets' ``answer_type`` field) the split follows it. Without it a
    question counts as CLOSED iff all its reference answers with positive confidence are ``yes``/``no`` and as OPEN
    otherwise. This heuristic under-counts closed questions of VQA-RAD/SLAKE, whose closed set also has choice
    questions ("left or right?"), so pass the real types for reportable numbers.

    Questions are those of ``references``; a question without a prediction scores 0 (counted in ``num_missing``).
    Predictions for unknown question ids raise ``ValueError`` (they usually mean an id mismatch).

    Returns ``{"accuracy", "count", "closed_accuracy", "closed_count", "open_accuracy", "open_count", "num_missing",
    "answer_type_source"}``; accuracies are fractions in [0, 1] and ``None`` for an empty split.
    """
    if not references:
        raise ValueError("no questions to evaluate")
    unknown = set(predictions) - set(references)
    if unknown:
        raise ValueError(f"{len(unknown)} predictions have no reference, e.g. {next(iter(unknown))!r}")
    if answer_types is not None:
        untyped = set(references) - set(answer_types)
        if untyped:
            raise ValueError(f"{len(untyped)} questions have no answer type, e.g. {next(iter(untyped))!r}")

    scores: dict[str, list[float]] = {CLOSED: [], OPEN: []}
    overall: list[float] = []
    num_missing = 0
    for qid, reference in references.items():
        confidences = _reference_confidences(reference)
        prediction = predictions.get(qid)
        if prediction is None:
            num_missing += 1
            score = 0.0
        else:
            score = confidences.get(_normalize_answer(prediction), 0.0)
        if answer_types is not None:
            answer_type = answer_types[qid].strip().upper()
            if answer_type not in scores:
                raise ValueError(f"answer type of {qid!r} must be CLOSED or OPEN, got {answer_types[qid]!r}")
        else:
            answer_type = _heuristic_answer_type(confidences)
        scores[answer_type].append(score)
        overall.append(score)

    return {
        "accuracy": _mean(overall),
        "count": len(overall),
        "closed_accuracy": _mean(scores[CLOSED]) if scores[CLOSED] else None,
        "closed_count": len(scores[CLOSED]),
        "open_accuracy": _mean(scores[OPEN]) if scores[OPEN] else None,
        "open_count": len(scores[OPEN]),
        "num_missing": num_missing,
        "answer_type_source": "given" if answer_types is not None else "yes/no heuristic",
    }


def accuracy(predictions: Sequence[Any], references: Sequence[Any], normalize: bool = True) -> float:
    """Exact-match accuracy for NLI (``yes``/``maybe``/``no``) and image classification labels.

    With ``normalize`` string labels are compared after ``strip().lower()``; other values (ints) compare as is.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no items to evaluate")

    def norm(value: Any) -> Any:
        return _normalize_answer(value) if normalize and isinstance(value, str) else value

    return sum(norm(p) == norm(r) for p, r in zip(predictions, references)) / len(references)


# ----------------------------------------------------------------------------------------------------------------------
# captioning: _bioclean, CIDEr-D, ROUGE-L (pycocoevalcap semantics)
# ----------------------------------------------------------------------------------------------------------------------

_BIOCLEAN_QUOTES = re.compile(r"[\"/\\']")
# The original pattern is '[.,?;*!%^&_+():-\[\]{}]', in which ':-\[' is a *range* (':' .. '['): it also deletes
# '<', '=', '>', '@' (and A-Z, which no longer occur after lower()), while '-' itself, '#', '$', '|', '~' and '`'
# survive. Spelled out here so the behaviour is visible.
_BIOCLEAN_PUNCT = re.compile(r"[.,?;*!%^&_+()<=>:@\[\]{}]")


def bioclean(caption: str) -> str:
    """The caption normalisation of ``metric_caption.py`` (``_bioclean``), applied to hypotheses and references.

    Deletes ``" / \\ '``, strips, lowercases, then deletes ``. , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { }``. Nothing is
    replaced by a space, so ``"a.b"`` becomes ``"ab"`` and ``"a , b"`` keeps two spaces; non-ASCII letters are kept.
    """
    return _BIOCLEAN_PUNCT.sub("", _BIOCLEAN_QUOTES.sub("", caption).strip().lower())


@dataclass(frozen=True)
class DocumentFrequency:
    """CIDEr-D idf statistics: in how many documents (images) each n-gram occurs in the references, and how many
    documents there are (the original's cached ``*-valid-words.p`` stores the latter as ``ref_len``)."""

    counts: Mapping[Ngram, float]
    num_documents: float


def _ngram_counts(text: str, n: int) -> Counter[Ngram]:
    # pycocoevalcap's precook: whitespace split, all 1..n-grams.
    words = text.split()
    counts: Counter[Ngram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def compute_document_frequency(references: Mapping[Hashable, Sequence[str]], n: int = 4) -> DocumentFrequency:
    """Document frequencies of all 1..n-grams over the references (one document = all references of one item)."""
    counts: Counter[Ngram] = Counter()
    for refs in references.values():
        counts.update({ngram for ref in refs for ngram in _ngram_counts(ref, n)})
    return DocumentFrequency(counts=dict(counts), num_documents=float(len(references)))


def load_document_frequency(path: str | Path) -> DocumentFrequency:
    """Read the original's cached CIDEr-D statistics (``word_freq/*-valid-words.p``).

    The file is a pickle of ``{"document_frequency": {ngram tuple: df}, "ref_len": number of documents}`` written
    under Python 2, hence ``encoding="latin1"``. Unpickling runs code from the file: only load trusted files.
    """
    with open(path, "rb") as handle:
        data = pickle.load(handle, encoding="latin1")  # trusted input only, see docstring
    return _as_document_frequency(data)


def _as_document_frequency(value: DocumentFrequency | Mapping[str, Any]) -> DocumentFrequency:
    if isinstance(value, DocumentFrequency):
        return value
    if "document_frequency" in value and "ref_len" in value:
        return DocumentFrequency(counts=dict(value["document_frequency"]), num_documents=float(value["ref_len"]))
    raise TypeError("document_frequency must be a DocumentFrequency or a dict with 'document_frequency' and 'ref_len'")


class _TfIdf(NamedTuple):
    vectors: list[dict[Ngram, float]]  # per n-gram order
    norms: list[float]
    length: int


def _tfidf(counts: Counter[Ngram], df: Mapping[Ngram, float], log_num_documents: float, n: int) -> _TfIdf:
    vectors: list[dict[Ngram, float]] = [{} for _ in range(n)]
    squared = [0.0] * n
    length = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        # unseen n-grams get df 1, i.e. the largest idf (pycocoevalcap's max(1.0, df))
        weight = term_frequency * (log_num_documents - math.log(max(1.0, df.get(ngram, 0.0))))
        vectors[order][ngram] = weight
        squared[order] += weight * weight
        if order == 1:
            # pycocoevalcap measures length in *bigrams* (len(words) - 1), kept for identical penalties
            length += term_frequency
    return _TfIdf(vectors, [math.sqrt(value) for value in squared], length)


def _cider_d_similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> list[float]:
    delta = hyp.length - ref.length
    penalty = math.exp(-(delta * delta) / (2.0 * sigma * sigma))
    values = []
    for order, hyp_vector in enumerate(hyp.vectors):
        ref_vector = ref.vectors[order]
        # CIDEr-D clipping: a hypothesis n-gram is credited at most as often as the reference has it
        dot = sum(
            min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0) for ngram, weight in hyp_vector.items()
        )
        norm = hyp.norms[order] * ref.norms[order]
        values.append((dot / norm if norm != 0 else dot) * penalty)
    return values


def cider_d_scores(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    sigma: float = 6.0,
    n: int = 4,
    document_frequency: DocumentFrequency | Mapping[str, Any] | None = None,
) -> dict[Hashable, float]:
    """Per-item CIDEr-D; see :func:`caption_cider_d`."""
    _check_same_keys(candidates, references)
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references of {key!r} must be a non-empty list of strings")
    if document_frequency is None:
        stats = compute_document_frequency(references, n)
    else:
        stats = _as_document_frequency(document_frequency)
    log_num_documents = math.log(stats.num_documents)

    scores: dict[Hashable, float] = {}
    for key, refs in references.items():
        hyp = _tfidf(_ngram_counts(candidates[key], n), stats.counts, log_num_documents, n)
        total = [0.0] * n
        for ref_text in refs:
            ref = _tfidf(_ngram_counts(ref_text, n), stats.counts, log_num_documents, n)
            total = [a + b for a, b in zip(total, _cider_d_similarity(hyp, ref, sigma))]
        # mean over n-gram orders, mean over references, times 10 (pycocoevalcap)
        scores[key] = 10.0 * (math.fsum(total) / n) / len(refs)
    return scores


def caption_cider_d(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    sigma: float = 6.0,
    n: int = 4,
    document_frequency: DocumentFrequency | Mapping[str, Any] | None = None,
) -> float:
    """Corpus CIDEr-D as pycocoevalcap's ``Cider`` (and OFA's in-training ``CiderD``): mean of per-item scores.

    Per item: each 1..n-gram gets the tf-idf weight ``tf * (log(N) - log(max(1, df)))``; for every order the clipped
    cosine ``sum(min(h, r) * r) / (|h| |r|)`` between hypothesis and each reference is multiplied by the Gaussian
    length penalty ``exp(-(len_h - len_r)^2 / (2 sigma^2))``; the item score is 10 x the mean over orders and
    references. Text is tokenised by whitespace only (apply :func:`bioclean` first, as :func:`caption_metrics` does).

    ``document_frequency=None`` computes df and N from the references of the evaluated corpus (pycocoevalcap and the
    original's ``df="corpus"``); pass a :class:`DocumentFrequency`, the dict of the original's cached
    ``*-valid-words.p`` (or use :func:`load_document_frequency`) to score against fixed statistics as the
    in-training ``--eval-cider-cached-tokens`` does.

    Differences: an n-gram order whose hypothesis or reference vector has zero norm (empty or too-short caption, or
    all n-grams in every document) contributes 0, as in OFA's ``CiderD``; the tylin/salaniz pycocoevalcap divides by
    zero there and produces NaN. The length is pycocoevalcap's bigram count (words - 1), so a one-word and an empty
    caption have the same length.
    """
    return _mean(list(cider_d_scores(candidates, references, sigma, n, document_frequency).values()))


def rouge_l(candidate: str, references: Sequence[str], beta: float = 1.2) -> float:
    """Sentence ROUGE-L of pycocoevalcap's ``Rouge`` (``beta = 1.2``).

    Tokens are ``text.split(" ")`` exactly as pycocoevalcap, so repeated spaces yield empty tokens (this matters for
    :func:`bioclean` output such as ``"a  b"``). Precision ``LCS/len(candidate)`` and recall ``LCS/len(reference)``
    are maximised over the references *independently* and then combined as
    ``(1 + beta^2) P R / (R + beta^2 P)``, which can exceed the best single-reference F-measure; this is the
    original's behaviour and kept on purpose. Returns 0 when the maximal precision or recall is 0.
    """
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty list of strings")
    candidate_tokens = candidate.split(" ")
    best_precision = best_recall = 0.0
    for reference in references:
        reference_tokens = reference.split(" ")
        lcs = _lcs_length(reference_tokens, candidate_tokens)
        best_precision = max(best_precision, lcs / len(candidate_tokens))
        best_recall = max(best_recall, lcs / len(reference_tokens))
    if best_precision == 0 or best_recall == 0:
        return 0.0
    beta2 = beta * beta
    return (1 + beta2) * best_precision * best_recall / (best_recall + beta2 * best_precision)


def caption_metrics(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, str | Sequence[str]],
    document_frequency: DocumentFrequency | Mapping[str, Any] | None = None,
    clean: bool = True,
) -> dict[str, float]:
    """Corpus ``{"cider": CIDEr-D, "rouge_l": mean ROUGE-L}`` as ``scripts/caption/metric_caption.py``.

    Hypotheses and references are passed through :func:`bioclean` first (``clean=False`` skips it); a single
    reference string per item (the original's layout, one gold caption per image) or a list is accepted. CIDEr-D uses
    corpus document frequencies unless ``document_frequency`` is given (see :func:`caption_cider_d`).
    """
    _check_same_keys(candidates, references)

    def prepare(text: str) -> str:
        return bioclean(text) if clean else text

    hyps = {key: prepare(text) for key, text in candidates.items()}
    refs = {
        key: [prepare(value)] if isinstance(value, str) else [prepare(text) for text in value]
        for key, value in references.items()
    }
    return {
        "cider": caption_cider_d(hyps, refs, document_frequency=document_frequency),
        "rouge_l": _mean([rouge_l(hyps[key], refs[key]) for key in refs]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# summarization: rouge-score tokenizer + Porter stemmer, Gigaword post-processing
# ----------------------------------------------------------------------------------------------------------------------


class PorterStemmer:
    """Porter (1980) stemmer in the variant of NLTK's default mode (``NLTK_EXTENSIONS``), the one rouge-score uses.

    On top of the published algorithm: a small table of irregular forms (``dying -> die``, ``skies -> sky`` ...),
    words of at most 2 letters are returned unchanged, ``-ies``/``-ied`` of 4-letter words keep ``ie``
    (``dies -> die``),
    ``y -> i`` only after a consonant that is not the first letter (``enjoy`` stays), ``-bli -> -ble`` instead of
    ``-abli -> -able``, ``-alli -> -al`` applied first and re-run through step 2, ``-fulli -> -ful``, ``-logi -> -log``
    measured with the ``l`` in the stem, and a 2-letter vowel-consonant word counts as ``*o`` (cvc). Input must be
    lowercase. Written from the published algorithm and those documented NLTK departures, not copied from NLTK.
    """

    _IRREGULAR = {
        "sky": "sky",
        "skies": "sky",
        "dying": "die",
        "lying": "lie",
        "tying": "tie",
        "news": "news",
        "innings": "inning",
        "inning": "inning",
        "outings": "outing",
        "outing": "outing",
        "cannings": "canning",
        "canning": "canning",
        "howe": "howe",
        "proceed": "proceed",
        "exceed": "exceed",
        "succeed": "succeed",
    }
    _STEP2 = (
        ("ational", "ate"),
        ("tional", "tion"),
        ("enci", "ence"),
        ("anci", "ance"),
        ("izer", "ize"),
        ("bli", "ble"),
        ("alli", "al"),
        ("entli", "ent"),
        ("eli", "e"),
        ("ousli", "ous"),
        ("ization", "ize"),
        ("ation", "ate"),
        ("ator", "ate"),
        ("alism", "al"),
        ("iveness", "ive"),
        ("fulness", "ful"),
        ("ousness", "ous"),
        ("aliti", "al"),
        ("iviti", "ive"),
        ("biliti", "ble"),
        ("fulli", "ful"),
    )
    _STEP3 = (
        ("icate", "ic"),
        ("ative", ""),
        ("alize", "al"),
        ("iciti", "ic"),
        ("ical", "ic"),
        ("ful", ""),
        ("ness", ""),
    )
    _STEP4 = (
        "al",
        "ance",
        "ence",
        "er",
        "ic",
        "able",
        "ible",
        "ant",
        "ement",
        "ment",
        "ent",
        "ion",
        "ou",
        "ism",
        "ate",
        "iti",
        "ous",
        "ive",
        "ize",
    )

    @staticmethod
    def _is_consonant(word: str, i: int) -> bool:
        # 'y' is a consonant at the start or after a vowel, a vowel after a consonant
        letter = word[i]
        if letter in "aeiou":
            return False
        if letter == "y":
            return i == 0 or not PorterStemmer._is_consonant(word, i - 1)
        return True

    @classmethod
    def _measure(cls, stem: str) -> int:
        pattern = "".join("c" if cls._is_consonant(stem, i) else "v" for i in range(len(stem)))
        return pattern.count("vc")

    @classmethod
    def _has_vowel(cls, stem: str) -> bool:
        return any(not cls._is_consonant(stem, i) for i in range(len(stem)))

    @classmethod
    def _ends_double_consonant(cls, word: str) -> bool:
        return len(word) >= 2 and word[-1] == word[-2] and cls._is_consonant(word, len(word) - 1)

    @classmethod
    def _ends_cvc(cls, word: str) -> bool:
        c = cls._is_consonant
        if len(word) == 2:
            return not c(word, 0) and c(word, 1)
        return (
            len(word) >= 3
            and c(word, len(word) - 3)
            and not c(word, len(word) - 2)
            and c(word, len(word) - 1)
            and word[-1] not in "wxy"
        )

    def _step1a(self, word: str) -> str:
        if word.endswith("ies") and len(word) == 4:
            return word[:-1]
        if word.endswith("sses") or word.endswith("ies"):
            return word[:-2]
        if word.endswith("ss"):
            return word
        return word[:-1] if word.endswith("s") else word

    def _step1b(self, word: str) -> str:
        if word.endswith("ied"):
            return word[:-1] if len(word) == 4 else word[:-2]
        if word.endswith("eed"):
            return word[:-1] if self._measure(word[:-3]) > 0 else word
        for suffix in ("ed", "ing"):
            if word.endswith(suffix) and self._has_vowel(word[: -len(suffix)]):
                stem = word[: -len(suffix)]
                break
        else:
            return word
        if stem.endswith(("at", "bl", "iz")):
            return stem + "e"
        if self._ends_double_consonant(stem):
            return stem if stem[-1] in "lsz" else stem[:-1]
        if self._measure(stem) == 1 and self._ends_cvc(stem):
            return stem + "e"
        return stem

    def _step1c(self, word: str) -> str:
        if word.endswith("y") and len(word) > 2 and self._is_consonant(word, len(word) - 2):
            return word[:-1] + "i"
        return word

    def _step2(self, word: str) -> str:
        if word.endswith("alli") and self._measure(word[:-4]) > 0:
            return self._step2(word[:-2])
        for suffix, replacement in self._STEP2:
            if word.endswith(suffix):
                # the first matching suffix decides, even when its condition fails (as in Porter's C code)
                return word[: -len(suffix)] + replacement if self._measure(word[: -len(suffix)]) > 0 else word
        if word.endswith("logi"):
            return word[:-1] if self._measure(word[:-3]) > 0 else word
        return word

    def _step3(self, word: str) -> str:
        for suffix, replacement in self._STEP3:
            if word.endswith(suffix):
                return word[: -len(suffix)] + replacement if self._measure(word[: -len(suffix)]) > 0 else word
        return word

    def _step4(self, word: str) -> str:
        for suffix in self._STEP4:
            if word.endswith(suffix):
                stem = word[: -len(suffix)]
                ok = self._measure(stem) > 1 and (suffix != "ion" or stem.endswith(("s", "t")))
                return stem if ok else word
        return word

    def _step5(self, word: str) -> str:
        if word.endswith("e"):
            stem = word[:-1]
            measure = self._measure(stem)
            if measure > 1 or (measure == 1 and not self._ends_cvc(stem)):
                word = stem
        if word.endswith("ll") and self._measure(word[:-1]) > 1:
            word = word[:-1]
        return word

    def stem(self, word: str) -> str:
        """Stem of a lowercase word."""
        if word in self._IRREGULAR:
            return self._IRREGULAR[word]
        if len(word) <= 2:
            return word
        for step in (self._step1a, self._step1b, self._step1c, self._step2, self._step3, self._step4, self._step5):
            word = step(word)
        return word


_STEMMER = PorterStemmer()
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str, use_stemmer: bool = True) -> list[str]:
    """rouge-score's default tokenizer: lowercase, every run of characters outside ``[a-z0-9]`` becomes a space
    (so accented and other non-ASCII letters split or vanish: ``"café" -> ["caf"]``), whitespace split, and with
    ``use_stemmer`` the Porter stem of tokens longer than 3 characters."""
    tokens = _NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    if use_stemmer:
        tokens = [_STEMMER.stem(token) if len(token) > 3 else token for token in tokens]
    return tokens


class RougeScore(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def _score(overlap: int, prediction_count: int, target_count: int) -> RougeScore:
    precision = overlap / max(prediction_count, 1)
    recall = overlap / max(target_count, 1)
    fmeasure = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return RougeScore(precision, recall, fmeasure)


def _rouge_n(prediction: list[str], target: list[str], n: int) -> RougeScore:
    def ngrams(tokens: list[str]) -> Counter[Ngram]:
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    prediction_ngrams, target_ngrams = ngrams(prediction), ngrams(target)
    overlap = sum((prediction_ngrams & target_ngrams).values())
    return _score(overlap, sum(prediction_ngrams.values()), sum(target_ngrams.values()))


def rouge_score_pair(prediction: str, reference: str, use_stemmer: bool = True) -> dict[str, RougeScore]:
    """ROUGE-1, ROUGE-2 and ROUGE-L (summary-level LCS, no sentence splitting) of one pair, as rouge-score."""
    prediction_tokens = rouge_tokenize(prediction, use_stemmer)
    target_tokens = rouge_tokenize(reference, use_stemmer)
    if prediction_tokens and target_tokens:
        lcs_score = _score(_lcs_length(target_tokens, prediction_tokens), len(prediction_tokens), len(target_tokens))
    else:
        lcs_score = RougeScore(0.0, 0.0, 0.0)
    return {
        "rouge1": _rouge_n(prediction_tokens, target_tokens, 1),
        "rouge2": _rouge_n(prediction_tokens, target_tokens, 2),
        "rougeL": lcs_score,
    }


def rouge_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures over prediction/reference pairs (rouge-score, one reference per prediction).

    ``use_stemmer=True`` as the original (HF ``datasets`` ROUGE with ``use_stemmer=True``); see :class:`PorterStemmer`.
    The result is the plain mean of per-pair F-measures, which is what the original's in-training ``rougeL_f1`` logs
    (``use_agregator=False``, summed and divided by the count; it multiplies by 100, we do not). HF's default
    ``BootstrapAggregator`` "mid" is a resampled estimate of the same mean and varies slightly from run to run.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no items to evaluate")
    pairs = [rouge_score_pair(p, r, use_stemmer) for p, r in zip(predictions, references)]
    return {key: _mean([pair[key].fmeasure for pair in pairs]) for key in ("rouge1", "rouge2", "rougeL")}


_TOKEN_MAP = {
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
    "[UNK]": "UNK",
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
}


def _is_number_with_commas(token: str) -> bool:
    return all(ch.isdigit() or ch == "," for ch in token)


def fix_tokenization(text: str) -> str:
    """Gigaword's ``fix_tokenization`` (OFA ``tasks/nlg_tasks/gigaword.py``), light version.

    On whitespace tokens: brackets become PTB tokens (``( -> -lrb-``), ``& < >`` HTML entities, ``"`` alternates
    between two backticks and two apostrophes, a lone ``'`` between one backtick and ``'``, ``don ' t -> do n't``,
    ``' s/d/ll -> 's/'d/'ll``, ``. . . -> ...``, ``3 , 000 -> 3,000``, ``3 . 5 -> 3.5``, ``- - -> --``, and
    ``a - b -> a-b``. Only the upper-case acronym rule (``U . N . -> U.N.``) is left out: the original runs this on
    lowercased hypotheses, where it can never fire. For ROUGE only the bracket/entity words (``lrb``, ``amp`` ...)
    and the ``n't`` split change the token sequence; the rest only moves punctuation, which rouge-score drops.
    """
    tokens = text.split()
    out: list[str] = []
    double_open = single_open = prev_dash = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        nxt2 = tokens[i + 2] if i + 2 < len(tokens) else None
        dash = False
        step = 1
        if tok in _TOKEN_MAP:
            out.append(_TOKEN_MAP[tok])
        elif tok == '"':
            out.append("''" if double_open else "``")
            double_open = not double_open
        elif tok == "'" and out and out[-1].endswith("n") and nxt == "t":
            out[-1] = out[-1][:-1]
            out.append("n't")
            step = 2
        elif tok == "'" and nxt in ("s", "d", "ll"):
            out.append("'" + nxt)
            step = 2
        elif tok == "'":
            out.append("'" if single_open else "`")
            single_open = not single_open
        elif tok == "." and nxt == "." and nxt2 == ".":
            out.append("...")
            step = 3
        elif tok == "," and out and _is_number_with_commas(out[-1]) and nxt is not None and _is_number_with_commas(nxt):
            out[-1] += "," + nxt
            step = 2
        elif tok == "." and out and out[-1].isdigit() and nxt is not None and nxt.isdigit():
            out[-1] += "." + nxt
            step = 2
        elif tok == "-":
            if nxt == "-":
                out.append("--")
                step = 2
            elif nxt is None or i == 0:
                out.append("-")
            # substring tests against string.punctuation, as the original (so "''" counts as a word here)
            elif out[-1] not in string.punctuation and nxt[0] not in string.punctuation:
                out[-1] += "-"
                dash = True
            else:
                out.append("-")
        elif prev_dash and out and tok[0] not in string.punctuation:
            out[-1] += tok
        else:
            out.append(tok)
        i += step
        prev_dash = dash
    return " ".join(out)


def postprocess_summary(hypothesis: str, replace_one_with_hash: bool = True) -> str:
    """The original's hypothesis post-processing for MeQSum: ``lower().strip()``, :func:`fix_tokenization`,
    ``<unk> -> " unk"`` and, by default, every ``1`` replaced by ``#``.

    ``replace_one_with_hash=True`` reproduces the original, which kept Gigaword's digit masking for MeQSum although
    its references are not masked; since rouge-score drops ``#``, ``"type 1"`` then scores as ``"type"`` and
    ``"10"`` as ``"0"``. Set it to False for scores that are not penalised by this convention.
    """
    text = fix_tokenization(hypothesis.lower().strip()).replace("<unk>", " unk")
    return text.replace("1", "#") if replace_one_with_hash else text


def summary_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    replace_one_with_hash: bool = True,
    use_stemmer: bool = True,
) -> dict[str, float]:
    """MeQSum ROUGE as the original: :func:`postprocess_summary` on hypotheses, lowercased references, then
    :func:`rouge_scores` -> ``{"rouge1", "rouge2", "rougeL"}`` F-measures in [0, 1].

    Note the default ``replace_one_with_hash=True`` (the original's Gigaword ``1 -> #`` convention, see
    :func:`postprocess_summary`).
    """
    hypotheses = [postprocess_summary(text, replace_one_with_hash) for text in predictions]
    return rouge_scores(hypotheses, [text.lower() for text in references], use_stemmer=use_stemmer)
