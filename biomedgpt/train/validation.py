"""Validation during fine-tuning with the code of ``biomedgpt-eval``, keeping the best model by the task's metric.

Every rank decodes its share of the validation rows with a full, ordinary copy of the model (ZeRO-3 partitions
gathered one parameter at a time, the EMA weights when the run keeps an average), so beam searches that end after
different numbers of steps on different ranks never meet a collective. Rank 0 scores all predictions together
(CIDEr needs the whole corpus) and, when the metric improves, writes ``<checkpoint.dir>/best``: a model directory
with tokenizer, :data:`~biomedgpt.data.finetune_tasks.TASK_FILE`, the validation metrics and predictions, ready for
``biomedgpt-eval`` and ``biomedgpt-generate``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from biomedgpt.data.finetune_tasks import FinetuneTaskConfig, load_answer_list, write_task_file
from biomedgpt.evaluation.runner import TaskEvaluator, iter_rows, load_answer_types
from biomedgpt.runtime.collectives import distributed
from biomedgpt.tasks import finetune_task
from biomedgpt.train.config import TrainConfig

BEST_DIR = "best"
BEST_METRICS_FILE = "validation_metrics.json"


def finetune_task_config(config: TrainConfig) -> FinetuneTaskConfig:
    """The input preparation of a fine-tuning run, shared by its training data, validation and saved models."""
    data = config.data
    return FinetuneTaskConfig(
        data.task,
        patch_image_size=data.patch_image_size,
        max_tgt_words=data.max_tgt_words,
        add_object=data.add_object,
        noise_ratio=data.noise_ratio,
        imagenet_normalization=data.imagenet_normalization,
    )


class Validator:
    """Collective: every rank constructs it and calls :meth:`run` at the same steps."""

    def __init__(self, config: TrainConfig, tokenizer: Any, rank: int, world_size: int, device: torch.device) -> None:
        section = config.validation
        assert section.data is not None
        self.config, self.tokenizer = config, tokenizer
        self.rank, self.world_size, self.device = rank, world_size, device
        # Each rank keeps only its share of the rows (images included); the text of every row stays for the
        # default candidate answers, which come from all of them.
        self.row_numbers: list[int] = []
        self.rows: list[dict[str, Any]] = []
        texts: list[dict[str, Any]] = []
        for number, row in enumerate(iter_rows(section.data, section.limit)):
            if number % world_size == rank:
                self.row_numbers.append(number)
                self.rows.append(row)
            texts.append({key: value for key, value in row.items() if not isinstance(value, bytes | bytearray)})
        if not texts:
            raise ValueError(f"validation.data={section.data}: no rows to validate on")
        self.row_count = len(texts)
        self.task_config = finetune_task_config(config)
        self.answers = load_answer_list(config.data.answers) if config.data.answers else None
        self.answer_types = load_answer_types(section.answer_types) if section.answer_types else None
        self.evaluator = TaskEvaluator(
            tokenizer,
            self.task_config,
            texts,
            answers=self.answers,
            batch_size=section.batch_size,
            beam=section.beam,
            max_len_b=section.max_len_b,
            source=section.data,
        )
        self.metric = section.metric or finetune_task(config.data.task).default_metric
        self.best_dir = Path(config.checkpoint.dir) / BEST_DIR
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_step: int | None = None  # the step last validated (a stop may skip a due validation)
        previous = self.best_dir.with_name(self.best_dir.name + ".old")
        if rank == 0 and not self.best_dir.exists() and previous.is_dir():
            previous.rename(self.best_dir)  # a crash between the two renames of _write_best left it there

    # ------------------------------------------------------------------------------------------------ schedule

    def due(self, step: int) -> bool:
        return step % self.config.validation.every_steps == 0 or step == self.config.optim.max_steps

    def missed(self, step: int) -> bool:
        """A due validation of ``step`` that did not run (the job stopped on that step): run it on resume."""
        return step > 0 and self.due(step) and self.last_step != step

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "metric": self.metric,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.last_step = state.get("last_step")
        if state.get("metric") == self.metric:
            self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        elif self.rank == 0 and state.get("best_value") is not None:
            warnings.warn(
                f"validation.metric changed from {state.get('metric')!r} to {self.metric!r}: the best model in "
                f"{self.best_dir} (by {state.get('metric')}) will be replaced by the next validation",
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------------------ run

    def run(self, module: torch.nn.Module, step: int, ema: Any = None, progress: bool = False) -> dict[str, float]:
        """Validate the current weights (or ``ema``'s); returns the numeric metrics (every rank) and records a new
        best model on rank 0."""
        from biomedgpt.train.ema import broadcast_buffers, plain_copy

        use_ema = ema is not None and self.config.validation.use_ema
        model = plain_copy(module, self.device, ema if use_ema else None)
        broadcast_buffers(model)  # every rank validates the model rank 0 writes
        records = self.evaluator.predict(model, self.rows, self.device, row_numbers=self.row_numbers, progress=progress)
        shares: list[Any] = [list(zip(self.row_numbers, records))]
        if distributed():
            shares = [None] * self.world_size
            dist.all_gather_object(shares, list(zip(self.row_numbers, records)))
        result: list[Any] = [None]
        if self.rank == 0:
            try:
                result = [self._score_and_keep(model, step, shares, use_ema)]
            except Exception as error:  # every rank must hear of it: the others wait in the broadcast below
                result = [error]
        if distributed():
            dist.broadcast_object_list(result, src=0)
        if isinstance(result[0], Exception):
            raise ValueError(f"validation at step {step} failed on rank 0: {result[0]}") from result[0]
        numeric, improved = result[0]
        if improved:
            self.best_value, self.best_step = numeric[self.metric], step
        self.last_step = step
        del model
        return numeric

    def _score_and_keep(
        self, model: torch.nn.Module, step: int, shares: list[Any], use_ema: bool
    ) -> tuple[dict[str, float], bool]:
        """Rank 0: metrics over every rank's predictions; a new best model is written."""
        ordered = [record for _, record in sorted(pair for share in shares for pair in share)]
        metrics = self.evaluator.metrics(ordered, self.answer_types)
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
        if self.metric not in numeric:
            raise ValueError(
                f"validation metric {self.metric!r} has no value on {self.config.validation.data} "
                f"(no questions of that kind among the validated rows?); it has {sorted(numeric)}"
            )
        improved = self.best_value is None or numeric[self.metric] > self.best_value
        if improved:
            self._write_best(model, step, metrics, ordered, use_ema)
        return numeric, improved

    def _write_best(
        self, model: torch.nn.Module, step: int, metrics: dict[str, Any], records: list[dict[str, Any]], ema: bool
    ) -> None:
        """Write the new best model under a temporary name and swap it in, so ``best`` is always whole."""
        staging = self.best_dir.with_name(self.best_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        write_task_file(staging, self.task_config, self.answers)
        summary = {"step": step, "metric": self.metric, "weights": "ema" if ema else "live", **metrics}
        (staging / BEST_METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        with open(staging / "validation_predictions.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        previous = self.best_dir.with_name(self.best_dir.name + ".old")
        if self.best_dir.exists():
            shutil.rmtree(previous, ignore_errors=True)
            self.best_dir.rename(previous)
        staging.rename(self.best_dir)
        shutil.rmtree(previous, ignore_errors=True)
