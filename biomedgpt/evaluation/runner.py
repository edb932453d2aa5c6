"""Evaluate a fine-tuned BiomedGPT model directory on a converted dataset, decoding as the original evaluation does
(BiomedGPT scripts/*/evaluate_*.sh, tasks/*/*.py ``valid_step``), and write predictions, metrics and (optionally)
an MLflow run.

Decoding per task:

- ``vqa``: trie-constrained beam search over the candidate answers with the question as forced decoder prefix,
  ``--beam=1 --unnormalized`` (the original ``evaluate_vqa_rad_beam_scale.sh``); the prediction is the text after
  the prefix;
- ``caption``: beam 5, ``max_len_b`` 16, ``no_repeat_ngram_size`` 3;
- ``summarization``: beam 5, length penalty 0.7, ``max_len_b`` 128, ``no_repeat_ngram_size`` 3;
- ``nli``: teacher-forced scores of ``maybe``/``yes``/``no`` after ``[bos] + source`` (no eos, as the NLI target),
  argmax;
- ``classification``: all-candidate scoring of the class names (with eos, trie-masked, no length normalisation),
  argmax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomedgpt.data.examples import Example, collate, images_on_device
from biomedgpt.data.finetune_tasks import (
    NLI_ANSWERS,
    TASK_FILE,
    FinetuneExampleBuilder,
    FinetuneTaskConfig,
    load_answer_list,  # noqa: F401 - re-exported
    read_task_file,
    write_task_file,  # noqa: F401 - re-exported
)
from biomedgpt.data.parquet_shards import iter_rows as read_rows
from biomedgpt.evaluation.metrics import accuracy, caption_metrics, summary_metrics, vqa_accuracy
from biomedgpt.model.generation import DecodingConfig, generate, score_candidates
from biomedgpt.tasks import FINETUNE_TASK_NAMES, FINETUNE_TASKS, finetune_task
from biomedgpt.tokenizer import BiomedGPTTokenizer

__all__ = [
    "EvaluationError",
    "TASK_FILE",
    "TaskEvaluator",
    "decoding_config",
    "evaluate",
    "iter_rows",
    "load_answer_list",
    "load_answer_types",
    "read_task_file",
    "write_task_file",
]

DEFAULT_IMAGE_SIZE = 256


class EvaluationError(ValueError):
    """Bad input to :func:`evaluate` (unknown task, missing or malformed data, answers or answer types)."""


# ----------------------------------------------------------------------------------------------------- inputs


def iter_rows(data_dir: str | os.PathLike[str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a converted dataset directory (``index.json`` + Parquet shards) in order."""
    try:
        yield from read_rows(data_dir, limit)
    except ValueError as error:
        raise EvaluationError(str(error)) from error


def load_answer_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """``question_id -> CLOSED/OPEN`` from a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise EvaluationError(f"cannot read answer types file {path}: {error}") from error
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a JSON object question_id -> CLOSED/OPEN")
    return {str(key): str(value) for key, value in data.items()}


def _data_answers(task: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Default candidate set: every answer (VQA) or label name (classification) in the evaluated rows."""
    seen: dict[str, None] = {}
    for row in rows:
        if task == "vqa":
            for answer in row["answers"]:
                seen.setdefault(str(answer), None)
        else:
            seen.setdefault(str(row["label_name"]), None)
    return list(seen)


def decoding_config(task: str, beam: int | None = None, max_len_b: int | None = None, **extra: Any) -> DecodingConfig:
    """The task's original decoding settings (fairseq's defaults for a task that scores candidates), with
    ``beam``/``max_len_b`` overrides. An unknown task is a ValueError naming the tasks."""
    settings = dict(finetune_task(task).decoding or {"beam_size": 5, "max_len_b": 16})
    if beam is not None:
        settings["beam_size"] = beam
    if max_len_b is not None:
        settings["max_len_b"] = max_len_b
    settings.update(extra)
    return DecodingConfig(**settings)


# ----------------------------------------------------------------------------------------------------- decoding


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return images_on_device(moved)  # the builders' uint8 images, normalised on the device


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    has_image = batch["patch_images"] is not None
    return {
        "patch_images": batch["patch_images"] if has_image else None,
        "patch_masks": batch["patch_masks"] if has_image else None,
    }


def _predict_batch(
    model: Any,
    tokenizer: BiomedGPTTokenizer,
    builder: FinetuneExampleBuilder,
    task: str,
    examples: list[Example],
    device: torch.device,
    decoding: DecodingConfig | None,
    candidates: list[str],
) -> list[str]:
    for example in examples:
        example.allowed_tokens = None  # decoding applies the trie itself; no [B, T, V] training masks
    batch = _to_device(collate(examples, tokenizer.pad_id), device)
    input_ids = batch["input_ids"]
    images = _model_inputs(batch)
    spec = finetune_task(task)
    if spec.generative:
        assert decoding is not None
        prefixes = None
        if spec.question_prefix:
            prefixes = [ex.extra["decoder_prefix"] for ex in examples]
            decoding = dataclasses.replace(decoding, constraint_trie=builder.trie)
        results = generate(model, input_ids, config=decoding, prefix_tokens=prefixes, **images)
        return [tokenizer.decode(hyps[0].generated_tokens).strip() if hyps else "" for hyps in results]
    answer_tokens = [tokenizer.encode(" " + answer) for answer in candidates]
    if spec.question_prefix:
        scores = score_candidates(
            model,
            input_ids,
            answer_tokens,
            constraint_trie=builder.trie,
            prefix_tokens=[ex.extra["decoder_prefix"] for ex in examples],
            append_eos=False,
            **images,
        )
    else:
        scores = score_candidates(model, input_ids, answer_tokens, constraint_trie=builder.trie, **images)
    return [candidates[int(index)] for index in scores.argmax(dim=1).tolist()]


# ----------------------------------------------------------------------------------------------------- metrics


def _compute_metrics(
    task: str, examples: list[dict[str, Any]], answer_types: Mapping[str, str] | None
) -> dict[str, Any]:
    if task == "vqa":
        predictions = {ex["id"]: ex["prediction"] for ex in examples}
        references = {ex["id"]: ex["references"] for ex in examples}
        types = None
        if answer_types is not None:
            types = {str(k): v for k, v in answer_types.items()}
            missing = [qid for qid in references if qid not in types]
            if missing:
                raise EvaluationError(f"{len(missing)} questions have no answer type, e.g. {missing[0]!r}")
        try:
            result = vqa_accuracy(predictions, references, types)
        except ValueError as error:
            raise EvaluationError(str(error)) from error
        return result
    if task == "caption":
        keyed = {i: ex for i, ex in enumerate(examples)}
        result = caption_metrics(
            {i: ex["prediction"] for i, ex in keyed.items()}, {i: ex["references"] for i, ex in keyed.items()}
        )
        return {**result, "count": len(examples)}
    if task == "summarization":
        result = summary_metrics([ex["prediction"] for ex in examples], [ex["references"][0] for ex in examples])
        return {**result, "count": len(examples)}
    return {
        "accuracy": accuracy([ex["prediction"] for ex in examples], [ex["reference"] for ex in examples]),
        "count": len(examples),
    }


def _record(task: str, example: Example, prediction: str, index: int) -> dict[str, Any]:
    record: dict[str, Any] = {"id": example.sample_id or str(index), "prediction": prediction}
    if finetune_task(task).references == "references":
        record["references"] = example.extra["references"]
    else:
        record["reference"] = example.extra["answer"]
    return record


def _log_to_mlflow(
    tracking_uri: str | None,
    experiment: str | None,
    task: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    out_dir: Path,
) -> str | None:
    from biomedgpt.tracking import MLflowTracker

    tracker = MLflowTracker(
        tracking_uri=tracking_uri,
        experiment_name=experiment or "biomedgpt-eval",
        run_name=f"eval-{task}-{Path(str(params['model'])).name}",
        tags={"biomedgpt.kind": "evaluation", "task": task},
        enabled=True,
        system_metrics=False,
        watchdog=False,
    )
    with tracker:
        run_id = tracker.start(params)
        numeric = {
            key: value
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and value is not None
        }
        tracker.log_metrics(numeric, step=0)
        tracker.log_artifacts(
            {"metrics.json": out_dir / "metrics.json", "predictions.jsonl": out_dir / "predictions.jsonl"},
            artifact_dir="evaluation",
        )
        tracker.flush()
    return run_id


# ----------------------------------------------------------------------------------------------------- evaluator


class TaskEvaluator:
    """Decode rows with an in-memory model and score the predictions as the original evaluation does.

    Shared by :func:`evaluate` (``biomedgpt-eval``) and validation during fine-tuning, so both report the same
    numbers. ``rows`` supply the default candidate answers of VQA / classification when ``answers`` is None.
    """

    def __init__(
        self,
        tokenizer: BiomedGPTTokenizer,
        task_config: FinetuneTaskConfig,
        rows: Sequence[Mapping[str, Any]],
        *,
        answers: Sequence[str] | None = None,
        batch_size: int = 8,
        beam: int | None = None,
        max_len_b: int | None = None,
        source: str = "data",
    ) -> None:
        task = task_config.task
        spec = finetune_task(task)
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
        try:
            self.decoding = decoding_config(task, beam, max_len_b) if spec.generative else None
            if spec.candidates == "fixed":
                candidates = list(NLI_ANSWERS.values())
            elif spec.candidates == "given":
                candidates = list(dict.fromkeys(answers)) if answers else _data_answers(task, rows)
            else:
                candidates = []
        except KeyError as error:
            raise EvaluationError(f"{source}: rows lack the column {error} that task {task!r} needs") from error
        except ValueError as error:
            raise EvaluationError(str(error)) from error
        if spec.candidates == "given" and not candidates:
            raise EvaluationError("no candidate answers: pass answers or evaluate data with answers")
        self.task, self.tokenizer, self.candidates = task, tokenizer, candidates
        self.batch_size, self.source = batch_size, source
        self.builder = FinetuneExampleBuilder(
            tokenizer, task_config, candidates if spec.candidates == "given" else None
        )

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "task": self.task,
            "batch_size": self.batch_size,
            "num_candidates": len(self.candidates),
        }
        if self.decoding is not None:
            params.update(
                beam=self.decoding.beam_size,
                max_len_b=self.decoding.max_len_b,
                len_penalty=self.decoding.len_penalty,
                normalize_scores=self.decoding.normalize_scores,
                no_repeat_ngram_size=self.decoding.no_repeat_ngram_size,
            )
        return params

    @torch.no_grad()
    def predict(
        self,
        model: Any,
        rows: Sequence[Mapping[str, Any]],
        device: torch.device,
        *,
        row_numbers: Sequence[int] | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """One record per row: ``{"id", "prediction", "reference(s)"}``; ``row_numbers`` name rows without an id
        (default: their positions)."""
        from tqdm.auto import tqdm

        numbers = list(range(len(rows))) if row_numbers is None else list(row_numbers)
        rng = np.random.default_rng(0)
        records: list[dict[str, Any]] = []
        bar = tqdm(total=len(rows), desc=f"evaluate {self.task}", unit="sample", disable=not progress)
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                try:
                    examples = [self.builder.build(dict(row), rng, train=False) for row in chunk]
                except KeyError as error:
                    raise EvaluationError(
                        f"{self.source}: rows lack the column {error} that task {self.task!r} needs"
                    ) from error
                predictions = _predict_batch(
                    model, self.tokenizer, self.builder, self.task, examples, device, self.decoding, self.candidates
                )
                for example, prediction, number in zip(examples, predictions, numbers[start : start + len(chunk)]):
                    records.append(_record(self.task, example, prediction, number))
                bar.update(len(chunk))
        finally:
            bar.close()
        return records

    def metrics(self, records: list[dict[str, Any]], answer_types: Mapping[str, str] | None = None) -> dict[str, Any]:
        return _compute_metrics(self.task, records, answer_types)


# ----------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model_dir: str | os.PathLike[str],
    task: str,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    beam: int | None = None,
    max_len_b: int | None = None,
    answers: list[str] | None = None,
    answer_types: Mapping[str, str] | None = None,
    limit: int | None = None,
    device: str | torch.device | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    image_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode ``data_dir`` (a converted fine-tuning dataset) with the model in ``model_dir``; return the metrics.

    Inputs are prepared as the model was fine-tuned when ``model_dir`` has a :data:`TASK_FILE` (written by the
    trainer and kept by ``biomedgpt-consolidate``): image size, VQA objects, ImageNet normalisation and the candidate
    answers come from it unless given here (``image_size`` otherwise defaults to 256).
    Writes ``out_dir/predictions.jsonl`` (one ``{"id", "prediction", "reference(s)"}`` per row) and
    ``out_dir/metrics.json``. With ``tracking_uri`` or ``experiment`` the metrics and both files are logged to a new
    MLflow run (``metrics["mlflow_run_id"]``). ``device=None`` picks cuda when available.
    Raises :class:`EvaluationError` on bad input.
    """
    from biomedgpt.model.modeling import BiomedGPTForConditionalGeneration

    if task not in FINETUNE_TASKS:
        raise EvaluationError(f"unknown task {task!r}; choose one of {list(FINETUNE_TASK_NAMES)}")
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be >= 1, got {limit}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvaluationError(f"{model_dir}: not a model directory (no config.json)")
    try:
        recorded = read_task_file(model_dir) or {}
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    if recorded.get("task") not in (None, task):
        recorded = {}  # fine-tuned for another task: its input settings do not apply
    try:
        task_config = FinetuneTaskConfig(
            task,
            patch_image_size=image_size or int(recorded.get("patch_image_size") or DEFAULT_IMAGE_SIZE),
            add_object=bool(recorded.get("add_object", False)),
            imagenet_normalization=bool(recorded.get("imagenet_normalization", False)),
        )
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    answers = answers or recorded.get("answers")

    rows = list(iter_rows(data_dir, limit))
    if not rows:
        raise EvaluationError(f"{data_dir}: no rows to evaluate")
    tokenizer = BiomedGPTTokenizer.from_pretrained(model_dir)
    evaluator = TaskEvaluator(
        tokenizer,
        task_config,
        rows,
        answers=answers,
        batch_size=batch_size,
        beam=beam,
        max_len_b=max_len_b,
        source=str(data_dir),
    )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).to(torch_device).eval()
    if len(tokenizer) > int(model.config.vocab_size):
        raise EvaluationError(f"tokenizer has {len(tokenizer)} tokens, model vocab_size is {model.config.vocab_size}")

    records = evaluator.predict(model, rows, torch_device, progress=progress)
    metrics = evaluator.metrics(records, answer_types)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    params: dict[str, Any] = {
        "model": str(model_dir),
        "data": str(data_dir),
        "image_size": task_config.patch_image_size,
        "add_object": task_config.add_object,
        "imagenet_normalization": task_config.imagenet_normalization,
        "limit": limit,
        **evaluator.params,
    }
    (out_dir / "metrics.json").write_text(json.dumps({"task": task, **metrics, "params": params}, indent=2) + "\n")
    if tracking_uri is not None or experiment is not None:
        run_id = _log_to_mlflow(tracking_uri, experiment, task, params, metrics, out_dir)
        if run_id is not None:
            metrics["mlflow_run_id"] = run_id
    return metrics
