"""Multiple-choice accuracy of a Hugging Face causal LM by candidate log-likelihood (PubMedQA, MedMCQA layouts).

Each question becomes a prompt; each candidate answer is scored by the summed log-probability of its tokens after
the prompt, and the best-scoring candidate is the prediction (as lm-evaluation-harness scores multiple choice).
Candidates are the words after ``Answer:`` (`` yes``/`` no``/`` maybe``, or the letters `` A``-`` D``), so the
comparison is between continuations of equal kind, with no length normalisation.

Layouts (one JSON object per line):

- ``pubmedqa``: ``question`` (or ``QUESTION``), the abstract as ``context`` (text) or ``contexts``/``CONTEXTS`` (a
  list of passages), and ``final_decision`` (``yes``, ``no`` or ``maybe``); ``id`` or ``pubid`` names it.
- ``medmcqa``: ``question``, the options ``opa``..``opd`` and the correct one as ``cop`` (0-3, as the Hugging Face
  dataset stores it) or ``answer`` (``A``-``D``); ``id`` names it.

Bad lines (not JSON, a missing or empty field, an answer that is none of the choices) are counted by reason and
written to ``rejects.jsonl`` with their line; they are not evaluated.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LAYOUTS", "MultipleChoiceError", "Question", "evaluate_multiple_choice", "read_questions"]


class MultipleChoiceError(ValueError):
    """Input that cannot be evaluated at all (unknown layout, unreadable file, no usable question)."""


@dataclass
class Question:
    id: str
    prompt: str
    choices: list[str]  # the answers as the model reads them after the prompt (" yes", " A", ...)
    labels: list[str]  # the answers as reported ("yes", "A", ...)
    answer: int  # index into choices


class _RejectError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _text(record: dict[str, Any], *names: str) -> str:
    for name in names:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return " ".join(v.strip() for v in value)
    raise _RejectError("missing_field", f"no text in {' / '.join(names)}")


def _pubmedqa(record: dict[str, Any], line: int) -> Question:
    question = _text(record, "question", "QUESTION")
    context = _text(record, "context", "contexts", "CONTEXTS")
    labels = ["yes", "no", "maybe"]
    decision = str(record.get("final_decision", record.get("answer", ""))).strip().lower()
    if decision not in labels:
        raise _RejectError("unknown_answer", f"final_decision {decision!r} is not yes, no or maybe")
    name = str(record.get("id", record.get("pubid", line)))
    prompt = f"Context: {context}\nQuestion: {question}\nAnswer:"
    return Question(name, prompt, [" " + label for label in labels], labels, labels.index(decision))


def _medmcqa(record: dict[str, Any], line: int) -> Question:
    question = _text(record, "question")
    options = [_text(record, key) for key in ("opa", "opb", "opc", "opd")]
    labels = ["A", "B", "C", "D"]
    if "cop" in record:
        answer = record["cop"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
            raise _RejectError("unknown_answer", f"cop {answer!r} is not 0-3 (the Hugging Face dataset's numbering)")
    else:
        letter = str(record.get("answer", "")).strip().upper()
        if letter not in labels:
            raise _RejectError("unknown_answer", f"no cop (0-3) and answer {letter!r} is not A-D")
        answer = labels.index(letter)
    lines = [f"Question: {question}", *(f"{label}. {option}" for label, option in zip(labels, options))]
    prompt = "\n".join(lines) + "\nAnswer:"
    return Question(str(record.get("id", line)), prompt, [" " + label for label in labels], labels, answer)


LAYOUTS: dict[str, Callable[[dict[str, Any], int], Question]] = {"pubmedqa": _pubmedqa, "medmcqa": _medmcqa}


def read_questions(path: str | os.PathLike[str], layout: str) -> tuple[list[Question], list[dict[str, Any]]]:
    """The questions of a JSONL file and the rejected lines (``line``, ``reason``, ``detail``)."""
    if layout not in LAYOUTS:
        raise MultipleChoiceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    try:
        raw_lines = Path(path).read_bytes().splitlines()
    except OSError as error:
        raise MultipleChoiceError(f"cannot read {path}: {error}") from error
    questions, rejects = [], []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise _RejectError("unreadable_json", str(error)) from None
            if not isinstance(record, dict):
                raise _RejectError("unreadable_json", "not a JSON object")
            questions.append(LAYOUTS[layout](record, number))
        except _RejectError as reject:
            rejects.append({"file": str(path), "line": number, "reason": reject.reason, "detail": str(reject)})
    return questions, rejects


@torch.no_grad()
def choice_log_likelihoods(
    model: Any, tokenizer: Any, questions: Sequence[Question], device: torch.device | str = "cpu"
) -> list[list[float]]:
    """Per question, the summed log-probability of each choice's tokens after its prompt (one padded forward)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences, spans = [], []
    for question in questions:
        prompt = list(tokenizer(question.prompt)["input_ids"])
        for choice in question.choices:
            continuation = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
            sequences.append(prompt + continuation)
            spans.append((len(prompt), len(prompt) + len(continuation)))
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    scores = []
    for row, (start, end) in enumerate(spans):
        targets = ids[row, start:end].to(log_probs.device)
        scores.append(float(log_probs[row, start - 1 : end - 1].gather(1, targets[:, None]).sum()))
    out, at = [], 0
    for question in questions:
        out.append(scores[at : at + len(question.choices)])
        at += len(question.choices)
    return out


def evaluate_multiple_choice(
    model_dir: str | os.PathLike[str],
    layout: str,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = False,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Score every question of ``data`` with the causal LM of ``model_dir`` (or the given ``model``/``tokenizer``);
    writes ``predictions.jsonl``, ``metrics.json`` and ``rejects.jsonl`` to ``out`` and returns the metrics."""
    questions, rejects = read_questions(data, layout)
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise MultipleChoiceError(f"{data}: no usable {layout} question ({len(rejects)} lines rejected)")
    if model is None or tokenizer is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
        model = model or AutoModelForCausalLM.from_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = range(0, len(questions), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=layout, unit="batch")
    correct, predicted = 0, Counter()
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for start in batches:
            chunk = questions[start : start + batch_size]
            for question, scores in zip(chunk, choice_log_likelihoods(model, tokenizer, chunk, device)):
                best = max(range(len(scores)), key=scores.__getitem__)
                correct += best == question.answer
                predicted[question.labels[best]] += 1
                record = {
                    "id": question.id,
                    "prediction": question.labels[best],
                    "answer": question.labels[question.answer],
                    "correct": best == question.answer,
                    "log_likelihoods": dict(zip(question.labels, scores)),
                }
                handle.write(json.dumps(record) + "\n")
    with (out_dir / "rejects.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(reject) + "\n" for reject in rejects)
    metrics = {
        "accuracy": correct / len(questions),
        "count": len(questions),
        "chance": 1 / len(questions[0].choices),
        "predicted": dict(sorted(predicted.items())),
        "rejected": dict(Counter(reject["reason"] for reject in rejects)),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return metrics
