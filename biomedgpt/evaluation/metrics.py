"""Task metrics of the BiomedGPT evaluation: the original's scorers, called through thin wrappers.

Captions and summaries are scored by the libraries the original evaluation used, so numbers are comparable with
published ones; what stays here is the original's text preparation around them and the VQA / classification scores.

- VQA (VQA-RAD/SLAKE/PathVQA): :func:`vqa_accuracy`; original ``ref_dict.get(pred, 0)`` (``vqa_score``).
- captioning: :func:`caption_metrics`; original ``scripts/caption/metric_caption.py``: :func:`bioclean`, then
  pycocoevalcap's CIDEr-D (``Cider``) and ROUGE-L (``Rouge``) without its PTB tokenizer (which needs Java).
- summarization (MeQSum): :func:`summary_metrics`; original HF ``datasets`` ROUGE, i.e. rouge-score's
  ``RougeScorer(use_stemmer=True)`` (NLTK's Porter stemmer), after Gigaword post-processing
  (:func:`postprocess_summary`).
- NLI / classification: :func:`accuracy`; exact match of the argmax label.

All scores are fractions (ROUGE in [0, 1], CIDEr-D on pycocoevalcap's scale where 1.227 is the "122.7" of papers).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score.rouge_scorer import RougeScorer

__all__ = [
    "accuracy",
    "bioclean",
    "caption_metrics",
    "fix_tokenization",
    "postprocess_summary",
    "rouge_scores",
    "summary_metrics",
    "vqa_accuracy",
]


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------------------


def _normalize_answer(text: str) -> str:
    return text.strip().lower()


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _check_same_keys(candidates: Mapping[Any, Any], references: Mapping[Any, Any]) -> None:
    # pycocoevalcap only asserts equal key sets; say how they differ (a silent intersection would hide id mismatches)
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
# captioning: _bioclean, then pycocoevalcap CIDEr-D and ROUGE-L
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


def _reference_list(key: Hashable, value: Any) -> list[str]:
    refs = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    if not refs or not all(isinstance(text, str) for text in refs):
        raise ValueError(f"references of {key!r} must be a string or a non-empty list of strings, got {value!r}")
    return refs


def caption_metrics(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, str | Sequence[str]],
    clean: bool = True,
) -> dict[str, float]:
    """Corpus ``{"cider": CIDEr-D, "rouge_l": mean ROUGE-L}`` as ``scripts/caption/metric_caption.py``.

    Hypotheses and references go through :func:`bioclean` (``clean=False`` skips it) and are then scored by
    pycocoevalcap's ``Cider`` and ``Rouge`` as they are: CIDEr-D splits on whitespace and takes its document
    frequencies from the references of this corpus; ROUGE-L splits on single spaces (so ``"a  b"`` has an empty
    token) with ``beta = 1.2``. A single reference string per item (the original's layout, one gold caption per
    image) or a list is accepted.
    """
    _check_same_keys(candidates, references)

    def prepare(text: str) -> str:
        return bioclean(text) if clean else text

    for key, text in candidates.items():
        if not isinstance(text, str):
            raise ValueError(f"candidate of {key!r} must be a string, got {text!r}")
    res = {key: [prepare(text)] for key, text in candidates.items()}
    gts = {key: [prepare(text) for text in _reference_list(key, value)] for key, value in references.items()}
    if not any(ref.split() for refs in gts.values() for ref in refs):
        # pycocoevalcap's CiderScorer fails on an empty document-frequency table (max() of nothing)
        raise ValueError("every reference caption is empty (after bioclean): check the references' text column")
    cider, _ = Cider().compute_score(gts, res)
    rouge_l, _ = Rouge().compute_score(gts, res)
    return {"cider": float(cider), "rouge_l": float(rouge_l)}


# ----------------------------------------------------------------------------------------------------------------------
# summarization: Gigaword post-processing, then rouge-score
# ----------------------------------------------------------------------------------------------------------------------

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of rouge-score's ``RougeScorer``, one reference per prediction.

    ``use_stemmer=True`` as the original (HF ``datasets`` ROUGE with ``use_stemmer=True``). The result is the plain
    mean of per-pair F-measures, which is what the original's in-training ``rougeL_f1`` logs (``use_agregator=False``,
    summed and divided by the count; it multiplies by 100, we do not). HF's default ``BootstrapAggregator`` "mid" is
    a resampled estimate of the same mean and varies slightly from run to run.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no items to evaluate")
    scorer = RougeScorer(list(_ROUGE_TYPES), use_stemmer=use_stemmer)
    pairs = [scorer.score(target=r, prediction=p) for p, r in zip(predictions, references)]
    return {key: _mean([pair[key].fmeasure for pair in pairs]) for key in _ROUGE_TYPES}


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
