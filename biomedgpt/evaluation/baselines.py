"""Answer-prior baselines for VQA: what a fine-tuned model has to beat to show it looks at the image.

- :func:`majority_answer_baseline`: every question gets the most frequent training answer (the usual "majority
  baseline");
- :func:`question_prior_baseline`: each question gets the most frequent training answer *of the same question
  text* (falling back to the overall majority), i.e. the best a model can do from the question alone when
  questions repeat, as they do in templated datasets.

Both read converted rows (``question_id``, ``question``, ``answers``, ``answer_confs``) and score with
:func:`~biomedgpt.evaluation.metrics.vqa_accuracy`, the metric of ``biomedgpt-eval``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from biomedgpt.data.examples import normalize_text
from biomedgpt.evaluation.metrics import vqa_accuracy


def _best_answer(row: Mapping[str, Any]) -> str:
    confidences = [float(c) for c in row["answer_confs"]]
    return str(row["answers"][confidences.index(max(confidences))])


def _question_key(row: Mapping[str, Any]) -> str:
    return normalize_text(str(row["question"])).rstrip("?")


def _score(predict: Any, eval_rows: list[Mapping[str, Any]], answer_types: Mapping[str, str] | None) -> dict[str, Any]:
    predictions = {str(row["question_id"]): predict(row) for row in eval_rows}
    references = {
        str(row["question_id"]): dict(zip(map(str, row["answers"]), map(float, row["answer_confs"])))
        for row in eval_rows
    }
    types = None if answer_types is None else {qid: answer_types[qid] for qid in references}
    return vqa_accuracy(predictions, references, types)


def majority_answer_baseline(
    train_rows: Iterable[Mapping[str, Any]],
    eval_rows: Iterable[Mapping[str, Any]],
    answer_types: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy of always answering the most frequent training answer; adds ``"answer"``."""
    counts = Counter(_best_answer(row) for row in train_rows)
    if not counts:
        raise ValueError("no training rows to take the majority answer from")
    majority = counts.most_common(1)[0][0]
    return {**_score(lambda row: majority, list(eval_rows), answer_types), "answer": majority}


def question_prior_baseline(
    train_rows: Iterable[Mapping[str, Any]],
    eval_rows: Iterable[Mapping[str, Any]],
    answer_types: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy of answering each question with the most frequent training answer of the same question text
    (the overall majority answer for questions not seen in training); adds ``"unseen_questions"``."""
    by_question: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for row in train_rows:
        answer = _best_answer(row)
        by_question.setdefault(_question_key(row), Counter())[answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError("no training rows to take the answer priors from")
    fallback = overall.most_common(1)[0][0]
    eval_rows = list(eval_rows)

    def predict(row: Mapping[str, Any]) -> str:
        prior = by_question.get(_question_key(row))
        return prior.most_common(1)[0][0] if prior else fallback

    unseen = sum(_question_key(row) not in by_question for row in eval_rows)
    return {**_score(predict, eval_rows, answer_types), "unseen_questions": unseen}
