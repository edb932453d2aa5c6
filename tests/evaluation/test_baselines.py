import pytest

from biomedgpt.evaluation.baselines import majority_answer_baseline, question_prior_baseline


def row(qid: str, question: str, answer: str) -> dict:
    return {"question_id": qid, "question": question, "answers": [answer], "answer_confs": [1.0]}


TRAIN = [
    row("1", "is there a circle?", "yes"),
    row("2", "is there a circle?", "yes"),
    row("3", "what color is the shape?", "red"),
    row("4", "what color is the shape?", "red"),
    row("5", "what color is the shape?", "blue"),
    row("6", "is there a square?", "no"),
    row("7", "What shape is shown", "circle"),
]
TEST = [
    row("a", "is there a circle?", "no"),
    row("b", "what color is the shape?", "red"),
    row("c", "what color is the shape?", "blue"),
    row("d", "is there a square?", "no"),
    row("e", "how many shapes are there?", "1"),
    row("f", "what shape is shown?", "circle"),
]
TYPES = {"a": "CLOSED", "b": "OPEN", "c": "OPEN", "d": "CLOSED", "e": "OPEN", "f": "OPEN"}


def test_majority_answer_baseline_by_hand():
    # Train answers: red 2, yes 2, blue/no/circle 1; the tie goes to the first seen, "yes".
    result = majority_answer_baseline(TRAIN, TEST, TYPES)
    assert result["answer"] == "yes"
    assert result["accuracy"] == 0.0 and result["count"] == 6


def test_question_prior_baseline_by_hand():
    result = question_prior_baseline(TRAIN, TEST, TYPES)
    # a: yes (wrong), b: red (right), c: red (wrong), d: no (right), e: unseen -> "yes" (wrong), f: circle (right;
    # the question matches "What shape is shown" after lower-casing and without "?")
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["closed_accuracy"] == pytest.approx(1 / 2) and result["open_accuracy"] == pytest.approx(2 / 4)
    assert result["unseen_questions"] == 1


def test_baselines_need_training_rows():
    with pytest.raises(ValueError, match="no training rows"):
        majority_answer_baseline([], TEST)
