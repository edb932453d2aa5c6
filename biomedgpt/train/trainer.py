"""The training loop: streamed batches -> DeepSpeed steps, with checkpoints, stop signals and MLflow metrics.

Model-agnostic: a recipe (:mod:`biomedgpt.train.recipes`) builds the model, tokenizer, data and loss.

Loss normalisation (BiomedGPT criterions/label_smoothed_cross_entropy.py ``forward`` and trainer.py ``train_step``,
made world-size independent): each sub-batch's summed loss is divided by its target-token count over *all* ranks
and micro-batches of the step, so a step's gradient is the same whether the global batch runs on 1 rank with
accumulation or on many ranks: ``L_v1 / ntok_v1 + L_v2 / ntok_v2`` for BiomedGPT pretraining (the original's two
sub-batches), ``L / ntok`` for a recipe with one.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomedgpt.data.transforms import rng_for
from biomedgpt.runtime.collectives import all_reduce
from biomedgpt.runtime.shared_memory import free_stale_shared_memory
from biomedgpt.runtime.signals import StopController, launcher_pid
from biomedgpt.train.checkpointing import (
    load_latest_checkpoint,
    load_rank_state,
    load_rank_states,
    save_checkpoint,
    set_rng_state,
)
from biomedgpt.train.engine import DistributedContext, init_distributed, initialize_engine
from biomedgpt.train.flops import training_flops
from biomedgpt.train.metrics import (
    device_peak_tflops,
    model_flops_utilisation,
    peak_memory_bytes,
    step_loss_metrics,
)
from biomedgpt.train.recipes import Recipe, build_recipe

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(rng_for(seed, step, rank, "dropout").integers(2**62))


@dataclass
class TrainState:
    """Everything a resumed run restores besides the engine's own (weights, optimizer, schedule) and the EMA: saved
    as the checkpoint's client state."""

    step: int = 0
    epoch: int = 0
    run_id: str | None = None
    loader: Any = None  # the loader's state_dict
    validation: Any = None  # the validator's state_dict
    rng_state: Any = field(default=None, repr=False)  # only read back (the checkpoint writes each rank's own)

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "epoch": self.epoch, "loader": self.loader, "mlflow_run_id": self.run_id}
        if self.validation is not None:
            state["validation"] = self.validation
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))
        self.run_id = state.get("mlflow_run_id")
        self.loader = state["loader"]
        self.validation = state.get("validation")
        self.rng_state = state.get("rng_state")


class Trainer:
    """Runs one training job; the same command resumes it from its newest complete checkpoint.

    Collective: every rank constructs it (process group, recipe, engine, data, EMA, validation, resumed state) and
    calls :meth:`run`.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.launcher = launcher_pid()  # first: if torchrun dies during the minutes of set-up, the parent changes
        # DeepSpeed 0.19 calls collectives torch deprecated in 2.14, once per parameter gather / gradient reduction.
        warnings.filterwarnings(
            "ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated", category=FutureWarning
        )
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.context: DistributedContext = init_distributed(config.dist_timeout_minutes)
        torch.manual_seed(config.seed + self.context.rank)  # dropout differs per rank, as with DDP
        self.recipe: Recipe = build_recipe(config)
        freed = free_stale_shared_memory(local_main=self.context.local_rank == 0)  # what killed runs left
        if freed:
            logger.info("freed %d shared-memory blocks that killed runs left in /dev/shm", len(freed))
        self.engine, self.ds_config = initialize_engine(config, self.context, self.recipe)
        self.checkpoint_dir = Path(config.checkpoint.dir)
        if self.context.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.recipe.write_run_files(self.checkpoint_dir, self.engine.module)
        data = self.recipe.build_data()
        self.dataset, self.loader, self.keys = data.dataset, data.loader, data.keys
        from biomedgpt.train.ema import ShardedEMA

        self.ema = (
            ShardedEMA(self.engine.module, config.ema.decay, config.ema.start_step) if config.ema.enabled else None
        )
        self.validator = self.recipe.build_validator(self.context.rank, self.context.world_size, self.context.device)
        self.state = TrainState()
        if config.checkpoint.resume:
            self._resume()
        self.iterator: Iterator[Any] = iter(self.loader)

    def _resume(self) -> None:
        client_state = load_latest_checkpoint(self.engine, self.checkpoint_dir, self.context.rank)
        if client_state is None:
            return
        self.state.load_state_dict(client_state)
        self.loader.load_state_dict(self.state.loader)
        if self.validator is not None:
            self.validator.load_state_dict(self.state.validation)
        if self.ema is not None:
            self._load_ema(Path(client_state["checkpoint_path"]))
        restored = f" with the EMA of {self.ema.num_updates} updates" if self.ema is not None else ""
        self._log("resuming from %s at step %d%s", self.checkpoint_dir, self.state.step, restored)

    def _log(self, message: str, *args: Any) -> None:
        if self.context.is_main:
            logger.info(message, *args)

    def _next_micro_batches(self, count: int) -> list[Any]:
        batches = []
        while len(batches) < count:
            try:
                batches.append(next(self.iterator))
            except StopIteration:
                self.state.epoch += 1
                self.iterator = iter(self.loader)
        return batches

    def train_step(self, micro_batches: list[Any], completed_steps: int = 0) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns globally reduced metrics."""
        recipe, keys = self.recipe, self.keys
        world, accumulation = self.context.world_size, len(micro_batches)
        tasks = recipe.task_names
        local_tokens = torch.tensor(
            [
                sum(recipe.target_tokens(recipe.sub_batches(mb)[key], completed_steps) for mb in micro_batches)
                for key in keys
            ],
            dtype=torch.float64,
        )
        global_tokens = all_reduce(local_tokens.clone())
        loss_sums = torch.zeros(len(keys), dtype=torch.float64)
        task_stats = torch.zeros(2, len(tasks), dtype=torch.float64)  # loss sum, tokens
        input_tokens = 0
        lr = float(self.engine.get_lr()[0])
        for micro_batch in micro_batches:
            loss = None
            for index, key in enumerate(keys):
                batch = recipe.sub_batches(micro_batch)[key]
                out = recipe.forward_loss(self.engine, batch, completed_steps, self.context.device)
                part = out.loss / max(float(global_tokens[index]), 1.0) * (world * accumulation)
                loss = part if loss is None else loss + part
                loss_sums[index] += float(out.loss.detach())
                input_tokens += recipe.input_tokens(batch)
                labels = recipe.example_tasks(batch) or []
                for task, example_loss, ntok in zip(labels, out.per_example.tolist(), out.per_example_tokens.tolist()):
                    if task in tasks:
                        task_stats[0, tasks.index(task)] += example_loss
                        task_stats[1, tasks.index(task)] += ntok
            self.engine.backward(loss)
            self.engine.step()
        reduced = all_reduce(torch.cat([loss_sums, task_stats.flatten(), torch.tensor([float(input_tokens)])]))
        loss_sums = reduced[: len(keys)]
        task_stats = reduced[len(keys) : -1].view(2, len(tasks))
        metrics: dict[str, float] = {"lr": lr}
        metrics.update(step_loss_metrics(keys, loss_sums.tolist(), global_tokens.tolist()))
        for index, task in enumerate(tasks):
            if task_stats[1, index] > 0:
                metrics[f"loss/{task}"] = float(task_stats[0, index] / task_stats[1, index])
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        metrics["target_tokens"] = float(global_tokens.sum())
        metrics["input_tokens"] = float(reduced[-1])
        return metrics

    def _step_flops(self, micro_batches: list[Any]) -> float:
        """Model FLOPs (forward + backward) of this step over all ranks, from the padded batch shapes."""
        total = sum(
            self.recipe.forward_flops(self.engine.module, self.recipe.sub_batches(micro_batch)[key])
            for micro_batch in micro_batches
            for key in self.keys
        )
        return float(all_reduce(torch.tensor([float(training_flops(total))], dtype=torch.float64))[0])

    def run(self) -> int:
        config, state = self.config, self.state
        from biomedgpt.train.tracking import start_tracking

        tracker, state.run_id = start_tracking(
            config, self.ds_config, self.context, state.run_id, self.recipe.tracking_tags()
        )
        stop = StopController(config.checkpoint.wall_clock_minutes, launcher=self.launcher).install()
        if state.rng_state is not None:
            set_rng_state(state.rng_state)  # last: everything above may draw random numbers (the loader's seed does)
        accumulation = config.batch.gradient_accumulation(self.context.world_size)
        peak_tflops = device_peak_tflops(config.precision, config.peak_tflops)
        progress = self._progress(state.step)
        status = "FINISHED"
        try:
            if self.validator is not None and self.validator.missed(state.step):
                self._validate(state.step, tracker)  # the previous job stopped on a due step before validating it
            while state.step < config.optim.max_steps:
                wait_started = time.perf_counter()
                micro_batches = self._next_micro_batches(accumulation)
                data_wait = time.perf_counter() - wait_started
                flops_per_step = self._step_flops(micro_batches)
                step_started = time.perf_counter()
                # Dropout and drop-path draw from a generator seeded by (seed, step, rank): a resumed run replays
                # them exactly, whatever else consumed random numbers since the checkpoint.
                torch.manual_seed(step_seed(config.seed, state.step, self.context.rank))
                metrics = self.train_step(micro_batches, state.step)
                state.step += 1
                step = state.step
                if self.ema is not None:
                    self.ema.update(self.engine.module, step)
                step_time = time.perf_counter() - step_started
                metrics.update(
                    step_time=step_time,
                    data_wait=data_wait,
                    samples_per_second=config.batch.global_batch_size / step_time,
                    tokens_per_second=metrics["input_tokens"] / step_time,
                    tflops_per_device=flops_per_step / step_time / 1e12 / self.context.world_size,
                    peak_memory_gb=peak_memory_bytes(self.context.device) / 2**30,
                    epoch=float(state.epoch),
                )
                mfu = model_flops_utilisation(flops_per_step, step_time, self.context.world_size, peak_tflops)
                if mfu is not None:
                    metrics["mfu"] = mfu
                if step % config.log_every_steps == 0 or step == config.optim.max_steps:
                    tracker.log_metrics(metrics, step)
                    self._report(progress, step, metrics)
                stopping = stop.should_stop()
                if self.validator is not None and self.validator.due(step) and not stopping:
                    self._validate(step, tracker)
                if step % config.checkpoint.every_steps == 0 or step == config.optim.max_steps or stopping:
                    self._save()
                if stopping:
                    status = "KILLED"
                    self._log("stopping at step %d: %s; checkpoint saved, exiting 0", step, stop.reason)
                    break
        except BaseException:
            tracker.finish("FAILED")
            raise
        finally:
            stop.uninstall()
            if progress is not None:
                progress.close()
        if self.validator is not None and self.validator.best_value is not None:
            tracker.log_metrics({f"best/{self.validator.metric}": self.validator.best_value}, state.step)
            tags = {"best_step": self.validator.best_step}
            if self.validator.best_dir is not None:
                tags["best_model"] = str(self.validator.best_dir)
            tracker.set_tags(tags)
        tracker.finish(status)
        if status == "FINISHED":
            self._log("training finished at step %d; checkpoints in %s", state.step, self.checkpoint_dir)
        return 0

    def _save(self) -> None:
        self.state.loader = self.loader.state_dict()
        self.state.validation = self.validator.state_dict() if self.validator is not None else None
        save_checkpoint(
            self.engine,
            self.config.checkpoint.dir,
            self.state.step,
            self.state.state_dict(),
            self.config.checkpoint.keep_last,
            self.context.rank,
            rank_states={"ema": self.ema.state_dict()} if self.ema is not None else None,
        )

    def _load_ema(self, checkpoint: Path) -> None:
        """This rank's own EMA file when it was saved under the same partitioning (the usual resume, 1/world of
        the model read); otherwise every saving rank's, resharded."""
        assert self.ema is not None
        own = load_rank_state(checkpoint, "ema", self.context.rank)
        if own is not None and self.ema.saved_alike(own):
            self.ema.load_state_dict(own)
        else:
            del own
            self.ema.load_state_dicts(load_rank_states(checkpoint, "ema"))

    def _validate(self, step: int, tracker: Any) -> None:
        started = time.perf_counter()
        validator = self.validator
        assert validator is not None
        metrics = validator.run(self.engine.module, step, self.ema, progress=self._progress_enabled())
        values = {f"val/{key}": value for key, value in metrics.items()}
        values["val/seconds"] = time.perf_counter() - started
        tracker.log_metrics(values, step)
        if self.context.is_main:
            best = (
                "new best"
                if validator.best_step == step
                else f"best {validator.best_value:.4f} at {validator.best_step}"
            )
            logger.info(
                "validation at step %d: %s=%.4f (%s) %s",
                step,
                validator.metric,
                metrics[validator.metric],
                best,
                " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())),
            )
            self._record(step, values)

    def _progress_enabled(self) -> bool:
        return self.context.is_main and not os.environ.get("BIOMEDGPT_NO_PROGRESS")

    def _progress(self, step: int) -> Any:
        if not self._progress_enabled():
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.optim.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0: one JSON line in <checkpoint.dir>/metrics.jsonl (a local record that survives an unreachable
        tracking server)."""
        record = Path(self.config.checkpoint.dir) / "metrics.jsonl"
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def _report(self, progress: Any, step: int, metrics: dict[str, float]) -> None:
        """Rank 0: progress bar, a log line, and the metrics.jsonl record."""
        if not self.context.is_main:
            return
        self._record(step, metrics)
        summary = f"loss={metrics['loss']:.4f} lr={metrics['lr']:.2e} {metrics['samples_per_second']:.1f} samples/s"
        if progress is not None:
            progress.update(step - progress.n)
            progress.set_postfix_str(summary)
        logger.info("step %d %s", step, " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())))
