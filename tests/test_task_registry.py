"""The fine-tuning task registry (biomedgpt/tasks.py) is complete: every registered task has a TSV kind, an example
builder, valid decoding settings, and evaluation computes each metric it lists; the run config accepts exactly the
registered tasks."""

from __future__ import annotations

import typing

import pytest

from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder
from biomedgpt.data.schema import KINDS
from biomedgpt.evaluation.runner import _compute_metrics
from biomedgpt.model.generation import DecodingConfig
from biomedgpt.tasks import FINETUNE_TASK_NAMES, FINETUNE_TASKS, TRAINING_TASKS, finetune_task
from biomedgpt.train.config import DataSection


@pytest.mark.parametrize("name", FINETUNE_TASK_NAMES)
def test_every_task_has_a_kind_a_builder_decoding_and_its_metrics(name: str) -> None:
    task = finetune_task(name)
    assert name in KINDS  # biomedgpt-convert --kind <task>
    assert callable(getattr(FinetuneExampleBuilder, f"_{name}", None))
    if task.generative:
        DecodingConfig(**task.decoding)  # the settings are ones the search takes
    records = [
        {
            "id": str(i),
            "prediction": answer,
            # VQA references carry each answer's confidence (the original's answer:score), the others are texts
            "references": {answer: 1.0, "other": 0.5} if name == "vqa" else [answer, "other"],
            "reference": answer,
        }
        for i, answer in enumerate(["yes", "no", "a small lesion"])
    ]
    metrics = _compute_metrics(name, records, None)
    assert set(task.metrics) <= set(metrics), f"{name}: evaluation reports {sorted(metrics)}"
    assert task.default_metric == task.metrics[0]


def test_the_run_config_takes_exactly_the_registered_tasks() -> None:
    hints = typing.get_type_hints(DataSection)
    assert typing.get_args(hints["task"]) == TRAINING_TASKS == ("pretrain", *FINETUNE_TASKS)
    with pytest.raises(ValueError, match=r"unknown fine-tuning task 'vqaa'; choose one of \['vqa'"):
        finetune_task("vqaa")
