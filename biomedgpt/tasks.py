"""The BiomedGPT fine-tuning tasks: the one place their names and properties are declared.

The data pipeline (examples), evaluation (decoding and metrics), the trainer's config and recipe, ``biomedgpt-generate``
and the demo all read this registry instead of spelling the task names out. It imports nothing heavy: loading a run
config reads it.

Sources: the fine-tuning scripts and datasets of BiomedGPT (scripts/<task>/train_*.sh and evaluate_*.sh;
data/mm_data/vqa_gen_dataset.py, caption_dataset.py, data/nlg_data/summary_dataset.py, data/nlu_data/,
data/cv_data/image_classify_dataset.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "FINETUNE_TASKS",
    "FINETUNE_TASK_NAMES",
    "PRETRAIN",
    "TRAINING_TASKS",
    "FinetuneTask",
    "finetune_task",
]

#: The training task of pretraining runs (the four-source mixture); not a fine-tuning task.
PRETRAIN = "pretrain"


@dataclass(frozen=True)
class FinetuneTask:
    """One downstream task.

    metrics: what evaluation reports that can select the best checkpoint, all higher-is-better; the first is the
        default validation metric (the original's ``--best-checkpoint-metric``).
    decoding: for generative tasks, the :class:`~biomedgpt.model.generation.DecodingConfig` settings of the original
        evaluation; None for tasks whose answer is picked among candidates by their log-likelihood.
    candidates: where the candidate answers come from: ``none`` (free text), ``given`` (a list given with
        ``answers``, else every answer of the evaluated rows; VQA also constrains training with a trie over them)
        or ``fixed`` (the task's own labels: NLI's yes/no/maybe).
    question_prefix: the example's prompt is forced as the decoder's prefix (VQA's question, NLI's question), so
        the answer is decoded or scored after it.
    references: the example field evaluation compares against: ``references`` (several) or ``answer`` (one).
    """

    name: str
    metrics: tuple[str, ...]
    decoding: Mapping[str, Any] | None = None
    candidates: Literal["none", "given", "fixed"] = "none"
    question_prefix: bool = False
    references: Literal["references", "answer"] = "answer"

    @property
    def generative(self) -> bool:
        return self.decoding is not None

    @property
    def default_metric(self) -> str:
        return self.metrics[0]


def _frozen(settings: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(settings)


FINETUNE_TASKS: Mapping[str, FinetuneTask] = MappingProxyType(
    {
        task.name: task
        for task in (
            # scripts/vqa/evaluate_vqa_rad_beam_scale.sh: greedy, unnormalised, over a trie of the answers
            FinetuneTask(
                "vqa",
                ("accuracy", "closed_accuracy", "open_accuracy"),
                _frozen({"beam_size": 1, "max_len_b": 200, "normalize_scores": False}),
                candidates="given",
                question_prefix=True,
                references="references",
            ),
            # the validation --eval-args of scripts/caption/train_peir_gross.sh (evaluate_peir_gross.sh decodes
            # with beam 10 and max_len_b 32)
            FinetuneTask(
                "caption",
                ("cider", "rouge_l"),
                _frozen({"beam_size": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}),
                references="references",
            ),
            # scripts/text_sum/evaluate_meqsum.sh
            FinetuneTask(
                "summarization",
                ("rougeL", "rouge1", "rouge2"),
                _frozen({"beam_size": 5, "max_len_b": 128, "len_penalty": 0.7, "no_repeat_ngram_size": 3}),
                references="references",
            ),
            FinetuneTask("nli", ("accuracy",), candidates="fixed", question_prefix=True),
            FinetuneTask("classification", ("accuracy",), candidates="given"),
        )
    }
)
FINETUNE_TASK_NAMES: tuple[str, ...] = tuple(FINETUNE_TASKS)
#: What ``data.task`` of a BiomedGPT run may say.
TRAINING_TASKS: tuple[str, ...] = (PRETRAIN, *FINETUNE_TASK_NAMES)


def finetune_task(name: str) -> FinetuneTask:
    try:
        return FINETUNE_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning task {name!r}; choose one of {list(FINETUNE_TASK_NAMES)}") from None
