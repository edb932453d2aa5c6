"""Perplexity on a held-out split, the validation of the Hugging Face recipes: token rows (``causal_lm``) or
conversations (``vision_chat``: the loss on the assistant's tokens).

Every rank scores its share of the rows (row ``i`` goes to rank ``i % world``) with the training module itself: under
ZeRO-3 its forward gathers each layer's weights as training does, so no rank ever holds the whole model, and every
rank runs the same number of forwards (a rank short of rows repeats a row and drops the result), since each forward
is a collective. Summed losses and target tokens are added across ranks: the loss per target token and its
exponential, the perplexity, do not depend on the number of ranks or the batch size. Lower is better; the best value
and its step are kept in the checkpoint. The live weights are validated (no EMA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from biomedgpt.data.parquet_shards import iter_rows
from biomedgpt.data.token_stream import token_row
from biomedgpt.runtime.collectives import all_reduce

__all__ = ["PerplexityValidator", "perplexity_validator"]


class PerplexityValidator:
    """Collective: every rank constructs it and calls :meth:`run` at the same steps."""

    metric = "perplexity"
    best_dir = None  # no model is written: consolidate the checkpoint of the best step

    def __init__(
        self,
        data: str,
        every_steps: int,
        max_steps: int,
        batch_size: int,
        collator: Callable[[list[Any]], dict[str, torch.Tensor]],
        model_inputs: Callable[[dict[str, torch.Tensor], torch.device], dict[str, torch.Tensor]],
        rank: int,
        world_size: int,
        device: torch.device,
        limit: int | None = None,
        example: Callable[[dict[str, Any]], Any] = token_row,
    ) -> None:
        try:  # a row that cannot be an example stops the run here, named (the split is small and read whole)
            rows = [example(row) for row in iter_rows(data, limit)]
        except ValueError as error:
            raise ValueError(f"validation.data={data}: {error}") from error
        if not rows:
            raise ValueError(f"validation.data={data}: no rows to validate on")
        self.rows = rows[rank::world_size]
        self.filler = rows[0]
        self.batches = math.ceil(math.ceil(len(rows) / world_size) / batch_size)  # rank 0 has the most rows
        self.row_count = len(rows)
        self.every_steps, self.max_steps, self.batch_size = every_steps, max_steps, batch_size
        self.collator, self.model_inputs, self.device = collator, model_inputs, device
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or step == self.max_steps

    def missed(self, step: int) -> bool:
        """A due validation of ``step`` that did not run (the job stopped on that step): run it on resume."""
        return step > 0 and self.due(step) and self.last_step != step

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
            self.last_step = state.get("last_step")

    def run(self, module: torch.nn.Module, step: int, ema: Any = None, progress: bool = False) -> dict[str, float]:
        """Loss per target token and perplexity of the current weights over the whole split (every rank)."""
        was_training = module.training
        module.eval()
        totals = torch.zeros(2, dtype=torch.float64)  # summed loss, target tokens
        try:
            with torch.no_grad():
                for index in range(self.batches):
                    rows = self.rows[index * self.batch_size : (index + 1) * self.batch_size]
                    batch = self.collator(rows or [self.filler])
                    out = module(**self.model_inputs(batch, self.device))
                    if rows:
                        totals[0] += float(out.nll_loss)
                        totals[1] += out.ntokens
        finally:
            module.train(was_training)
        loss_sum, tokens = all_reduce(totals).tolist()
        loss = loss_sum / max(tokens, 1.0)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
        if self.best_value is None or metrics[self.metric] < self.best_value:
            self.best_value, self.best_step = metrics[self.metric], step
        self.last_step = step
        return metrics


def perplexity_validator(
    settings: Any,
    *,
    collator: Callable[[list[Any]], dict[str, torch.Tensor]],
    model_inputs: Callable[[dict[str, torch.Tensor], torch.device], dict[str, torch.Tensor]],
    rank: int,
    world_size: int,
    device: torch.device,
    example: Callable[[dict[str, Any]], Any] = token_row,
) -> PerplexityValidator | None:
    """The validator a recipe's run settings ask for (their ``validation`` section and ``optim.max_steps``), or None
    when ``validation.data`` is not set."""
    section = settings.validation
    if not section.data:
        return None
    return PerplexityValidator(
        section.data,
        every_steps=section.every_steps,
        max_steps=settings.optim.max_steps,
        batch_size=section.batch_size,
        collator=collator,
        model_inputs=model_inputs,
        rank=rank,
        world_size=world_size,
        device=device,
        limit=section.limit,
        example=example,
    )
