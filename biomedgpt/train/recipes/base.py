"""What a recipe tells the training core: how to build the model, tokenizer, streamed data and loss of one model
family, and what a run writes beside its checkpoints for consolidation.

The core (:class:`biomedgpt.train.trainer.Trainer`) owns everything that does not depend on the model: the process
group, the DeepSpeed engine, the step loop with world-size independent loss normalisation, checkpoints, stop
signals, the EMA, tracking and progress. A recipe is built once per run from its config and holds no state that a
resumed run must restore (the trainer's :class:`~biomedgpt.train.trainer.TrainState` does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: loading a run config (which reads the recipe registry) must not import torch
    import torch

__all__ = ["DataPlan", "Recipe", "StepLoss", "report_problems"]


@dataclass
class DataPlan:
    """The streamed dataset, its loader (with ``state_dict``/``load_state_dict`` for mid-epoch resumption) and the
    names of the sub-batches of each micro-batch (each is normalised by its own target-token count)."""

    dataset: Any
    loader: Any
    keys: list[str]


@dataclass
class StepLoss:
    """The summed loss of one sub-batch and what the step metrics need from it."""

    loss: torch.Tensor  # summed over the target tokens the loss covers (the core divides by the step's total)
    per_example: torch.Tensor  # [B] summed loss of each example, detached
    per_example_tokens: torch.Tensor  # [B] target tokens each example's loss covers


class Recipe(ABC):
    """One model family on the training core; ``config`` is the run config of :attr:`config_class`."""

    #: The name ``recipe:`` selects in a run config.
    name: ClassVar[str]
    #: Labels that :meth:`example_tasks` gives examples; the step metrics report ``loss/<task>`` for each.
    task_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tokenizer = self.build_tokenizer()

    @classmethod
    @abstractmethod
    def plan_model(cls, config: Any) -> tuple[torch.nn.Module, list[str]]:
        """For ``--dry-run``, offline: the model built on the meta device (no weights read, no memory) and the lines
        that describe it (family, parameters, vocabulary, notes)."""

    @classmethod
    def check_environment(cls, config: Any) -> None:
        """Before any process group: a ValueError when this machine cannot run ``config`` (default: nothing)."""
        return None

    @abstractmethod
    def build_tokenizer(self) -> Any:
        """The tokenizer of the run (also written beside the checkpoints); built by the constructor."""

    @abstractmethod
    def build_model(self, ds_config: Mapping[str, Any]) -> torch.nn.Module:
        """The model, partitioned as it is built (``deepspeed.zero.Init``) under ZeRO-3 so that no rank holds it
        whole; memory switches (activation checkpointing, compilation) applied."""

    def parameter_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (default: every trainable parameter, with the config's weight decay)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    @abstractmethod
    def build_data(self) -> DataPlan:
        """The training stream of this rank."""

    def sub_batches(self, micro_batch: Any) -> dict[str, Any]:
        """The sub-batches of a micro-batch by key (default: the micro-batch itself, as ``main``)."""
        return {"main": micro_batch}

    @abstractmethod
    def target_tokens(self, batch: Any, completed_steps: int) -> int:
        """The target tokens the loss of ``batch`` covers in the update after ``completed_steps`` updates."""

    @abstractmethod
    def forward_loss(self, engine: Any, batch: Any, completed_steps: int, device: torch.device) -> StepLoss:
        """Forward ``batch`` (moved to ``device``) through ``engine`` and return its summed loss."""

    def example_tasks(self, batch: Any) -> list[str] | None:
        """The task label of each example of ``batch`` (for ``loss/<task>`` metrics), or None."""
        return None

    @abstractmethod
    def input_tokens(self, batch: Any) -> int:
        """Tokens the model reads for ``batch`` (padding excluded): the tokens/s metric."""

    @abstractmethod
    def forward_flops(self, model: torch.nn.Module, batch: Any) -> int:
        """Model FLOPs of one forward pass over ``batch`` as padded (the MFU metric)."""

    @abstractmethod
    def write_run_files(self, checkpoint_dir: Path, model: torch.nn.Module) -> None:
        """Rank 0, once at start: what consolidation needs besides the weights (model config, tokenizer, ...)."""

    def tracking_tags(self) -> dict[str, str]:
        """Tags of the run's MLflow run that say what was trained (e.g. the model size)."""
        return {}

    def build_validator(self, rank: int, world_size: int, device: torch.device) -> Any | None:
        """A periodic validation (``due``, ``missed``, ``run``, ``state_dict``, ...) or None."""
        return None


def report_problems(problems: list[str], allow_missing: bool, hint: str) -> list[str]:
    """A start check's verdict on ``problems``: a ValueError naming them all (``hint`` ends it), or with
    ``allow_missing`` (planning) the problems as warnings to show."""
    if problems and not allow_missing:
        raise ValueError("; ".join(problems) + (f". {hint}" if hint else ""))
    return [f"warning: {problem} (planning anyway: --allow-missing-data)" for problem in problems]
