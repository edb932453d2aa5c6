"""The training loop: streamed batches -> DeepSpeed steps, with checkpoints, stop signals and MLflow metrics.

Loss normalisation (BiomedGPT criterions/label_smoothed_cross_entropy.py ``forward`` and trainer.py ``train_step``,
made world-size independent): each sub-batch's summed loss is divided by its target-token count over *all* ranks
and micro-batches of the step, so a step's gradient is the same whether the global batch runs on 1 rank with
accumulation or on many ranks: ``L_v1 / ntok_v1 + L_v2 / ntok_v2`` for pretraining (the original's two
sub-batches), ``L / ntok`` for fine-tuning.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomedgpt.checkpoint.layout import TOKENIZER_DIR
from biomedgpt.data.examples import images_on_device
from biomedgpt.data.finetune_tasks import load_answer_list, write_task_file
from biomedgpt.data.pretrain_tasks import AUXILIARY_TASKS, IMAGE_TEXT_TASKS
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
from biomedgpt.train.config import TrainConfig
from biomedgpt.train.engine import DistributedContext, init_distributed, initialize_engine, load_tokenizer
from biomedgpt.train.flops import forward_flops, training_flops
from biomedgpt.train.fused_loss import fused_loss_parts, loss_output_from_parts
from biomedgpt.train.loss import kept_token_count, label_smoothed_cross_entropy
from biomedgpt.train.metrics import (
    device_peak_tflops,
    model_flops_utilisation,
    peak_memory_bytes,
    step_loss_metrics,
)
from biomedgpt.train.validation import Validator, finetune_task_config

FINETUNE_TASK_NAMES = ("vqa", "caption", "summarization", "nli", "classification")
ALL_TASKS = (*IMAGE_TEXT_TASKS, *AUXILIARY_TASKS, *FINETUNE_TASK_NAMES)
MODEL_INPUTS = ("input_ids", "patch_images", "patch_masks", "decoder_input_ids", "code_masks", "patch_indices")


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(rng_for(seed, step, rank, "dropout").integers(2**62))


def build_data(config: TrainConfig, tokenizer: Any) -> tuple[Any, Any, list[str]]:
    """The streamed dataset, its loader and the names of the sub-batches each micro-batch holds."""
    from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder
    from biomedgpt.data.pipeline import (
        FinetuneCollator,
        FinetuneStream,
        MixtureConfig,
        PretrainCollator,
        PretrainStream,
        make_loader,
    )
    from biomedgpt.data.pretrain_tasks import NegativeSamples, PretrainExampleBuilder, PretrainTaskConfig

    data = config.data
    streaming_kwargs = dict(
        batch_size=config.batch.micro_batch_size,
        shuffle=data.shuffle,
        shuffle_algo=data.shuffle_algo,
        shuffle_seed=data.seed,
        num_canonical_nodes=data.num_canonical_nodes,
    )
    if data.task == "pretrain":
        if not data.negative_samples:
            raise ValueError("pretraining needs data.negative_samples (type2ans.json, object.txt, all_captions.txt)")
        builder = PretrainExampleBuilder(
            tokenizer,
            NegativeSamples.load(data.negative_samples),
            PretrainTaskConfig(patch_image_size=data.patch_image_size, sample_patch_num=data.sample_patch_num),
        )
        mixture = MixtureConfig(data.mixture_period, data.mixture_text, data.mixture_image, data.mixture_detection)
        dataset = PretrainStream(
            builder,
            data.vision_language,
            data.text,
            data.image,
            data.detection,
            mixture,
            data.seed,
            data.remote_root,
            **streaming_kwargs,
        )
        collator = PretrainCollator(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        keys = ["v1", "v2"]
    else:
        builder = FinetuneExampleBuilder(
            tokenizer, finetune_task_config(config), load_answer_list(data.answers) if data.answers else None
        )
        dataset = FinetuneStream(builder, data.train, seed=data.seed, **streaming_kwargs)
        collator = FinetuneCollator(tokenizer.pad_id, len(tokenizer))
        keys = ["main"]
    loader = make_loader(dataset, config.batch.micro_batch_size, collator, data.num_workers)
    return dataset, loader, keys


class Trainer:
    """Runs one training job; the same command resumes it from its newest complete checkpoint."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.launcher = launcher_pid()  # now: if torchrun dies during the minutes of set-up, the parent changes

    def _sub_batches(self, micro_batch: Any) -> dict[str, dict[str, Any]]:
        return micro_batch if self.keys != ["main"] else {"main": micro_batch}

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.context.device, non_blocking=True)
            moved[key] = value
        # The loader hands over uint8 images: they are normalised (and cast) here, on the training device.
        return images_on_device(moved, torch.bfloat16 if self.config.precision == "bf16" else None)

    def _forward_loss(self, batch: dict[str, Any], drop_worst_ratio: float = 0.0) -> Any:
        batch = self._to_device(batch)
        inputs = {key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None}
        loss_args = dict(
            epsilon=self.config.optim.label_smoothing,
            padding_idx=self.tokenizer.pad_id,
            example_weights=batch["weights"],
            constraint_masks=batch.get("constraint_masks"),  # the fused loss applies them chunk by chunk
            drop_worst_ratio=drop_worst_ratio,
        )
        if self.config.optim.fused_loss:
            # Computed inside the model's output projection (see TiedOutputProjection): no [B, T, V] logits.
            hidden_state_loss = functools.partial(
                fused_loss_parts, target=batch["target"], chunk_size=self.config.optim.fused_loss_chunk_size,
                **loss_args,
            )  # fmt: skip
            output = self.engine(**inputs, hidden_state_loss=hidden_state_loss)
            return loss_output_from_parts(output.loss_parts)
        output = self.engine(**inputs)
        return label_smoothed_cross_entropy(output.logits, batch["target"], **loss_args)

    def _next_micro_batches(self, count: int) -> list[Any]:
        batches = []
        while len(batches) < count:
            try:
                batches.append(next(self.iterator))
            except StopIteration:
                self.epoch += 1
                self.iterator = iter(self.loader)
        return batches

    def train_step(self, micro_batches: list[Any], completed_steps: int = 0) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns globally reduced metrics."""
        world, accumulation = self.context.world_size, len(micro_batches)
        pad = self.tokenizer.pad_id
        drop_ratio = self.config.optim.drop_worst_ratio_at(completed_steps)
        local_tokens = torch.tensor(
            [
                sum(kept_token_count(self._sub_batches(mb)[k]["ntokens"], drop_ratio) for mb in micro_batches)
                for k in self.keys
            ],
            dtype=torch.float64,
        )
        global_tokens = all_reduce(local_tokens.clone())
        loss_sums = torch.zeros(len(self.keys), dtype=torch.float64)
        task_stats = torch.zeros(2, len(ALL_TASKS), dtype=torch.float64)  # loss sum, tokens
        input_tokens = 0
        lr = float(self.engine.get_lr()[0])
        for micro_batch in micro_batches:
            loss = None
            for index, key in enumerate(self.keys):
                batch = self._sub_batches(micro_batch)[key]
                out = self._forward_loss(batch, drop_ratio)
                part = out.loss / max(float(global_tokens[index]), 1.0) * (world * accumulation)
                loss = part if loss is None else loss + part
                loss_sums[index] += float(out.loss.detach())
                tokens = out.per_example_tokens  # the kept ones when the worst are dropped
                input_tokens += int(batch["input_ids"].ne(pad).sum()) + int(batch["decoder_input_ids"].ne(pad).sum())
                for task, example_loss, ntok in zip(batch["tasks"], out.per_example.tolist(), tokens.tolist()):
                    if task in ALL_TASKS:
                        task_stats[0, ALL_TASKS.index(task)] += example_loss
                        task_stats[1, ALL_TASKS.index(task)] += ntok
            self.engine.backward(loss)
            self.engine.step()
        reduced = all_reduce(torch.cat([loss_sums, task_stats.flatten(), torch.tensor([float(input_tokens)])]))
        loss_sums = reduced[: len(self.keys)]
        task_stats = reduced[len(self.keys) : -1].view(2, len(ALL_TASKS))
        metrics: dict[str, float] = {"lr": lr}
        metrics.update(step_loss_metrics(self.keys, loss_sums.tolist(), global_tokens.tolist()))
        for index, task in enumerate(ALL_TASKS):
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
        config = self.engine.module.config
        total = 0
        for micro_batch in micro_batches:
            for key in self.keys:
                batch = self._sub_batches(micro_batch)[key]
                images = batch.get("patch_images")
                kept = batch.get("patch_indices")
                total += forward_flops(
                    config,
                    int(batch["input_ids"].shape[0]),
                    int(batch["input_ids"].shape[1]),
                    int(batch["decoder_input_ids"].shape[1]),
                    None if images is None else (int(images.shape[-2]), int(images.shape[-1])),
                    None if kept is None else int(kept.shape[1]),
                )
        return float(all_reduce(torch.tensor([float(training_flops(total))], dtype=torch.float64))[0])

    def run(self) -> int:
        config = self.config
        # DeepSpeed 0.19 calls collectives torch deprecated in 2.14, once per parameter gather / gradient reduction.
        warnings.filterwarnings(
            "ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated", category=FutureWarning
        )
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.context: DistributedContext = init_distributed(config.dist_timeout_minutes)
        torch.manual_seed(config.seed + self.context.rank)  # dropout differs per rank, as with DDP
        self.tokenizer = load_tokenizer(config)
        freed = free_stale_shared_memory(local_main=self.context.local_rank == 0)  # what killed runs left
        if freed:
            print(f"freed {len(freed)} shared-memory blocks that killed runs left in /dev/shm", flush=True)
        self.engine, self.ds_config = initialize_engine(config, self.context, self.tokenizer)
        if self.context.is_main:
            # What a consolidated model needs besides the weights (biomedgpt-consolidate reads these).
            Path(config.checkpoint.dir).mkdir(parents=True, exist_ok=True)
            self.engine.module.config.save_pretrained(config.checkpoint.dir)
            self.tokenizer.save_pretrained(Path(config.checkpoint.dir) / TOKENIZER_DIR)
            if config.data.task != "pretrain":
                answers = load_answer_list(config.data.answers) if config.data.answers else None
                write_task_file(config.checkpoint.dir, finetune_task_config(config), answers)
        self.dataset, self.loader, self.keys = build_data(config, self.tokenizer)
        from biomedgpt.train.ema import ShardedEMA

        self.ema = (
            ShardedEMA(self.engine.module, config.ema.decay, config.ema.start_step) if config.ema.enabled else None
        )
        self.validator = (
            Validator(config, self.tokenizer, self.context.rank, self.context.world_size, self.context.device)
            if config.validation.data
            else None
        )
        self.epoch = 0
        accumulation = config.batch.gradient_accumulation(self.context.world_size)
        checkpoint_dir = Path(config.checkpoint.dir)

        step, run_id, rng = 0, None, None
        if config.checkpoint.resume:
            client_state = load_latest_checkpoint(self.engine, checkpoint_dir, self.context.rank)
            if client_state is not None:
                step = int(client_state["step"])
                run_id = client_state.get("mlflow_run_id")
                self.epoch = int(client_state.get("epoch", 0))
                self.loader.load_state_dict(client_state["loader"])
                rng = client_state.get("rng_state")
                if self.validator is not None:
                    self.validator.load_state_dict(client_state.get("validation"))
                if self.ema is not None:
                    self._load_ema(Path(client_state["checkpoint_path"]))
                if self.context.is_main:
                    restored = f" with the EMA of {self.ema.num_updates} updates" if self.ema is not None else ""
                    print(f"resuming from {checkpoint_dir} at step {step}{restored}", flush=True)
        self.iterator: Iterator[Any] = iter(self.loader)

        from biomedgpt.train.tracking import start_tracking

        tracker, run_id = start_tracking(config, self.ds_config, self.context, run_id)
        stop = StopController(config.checkpoint.wall_clock_minutes, launcher=self.launcher).install()
        if rng is not None:
            set_rng_state(rng)  # last: everything above may draw random numbers (the loader's base seed does)
        peak_tflops = device_peak_tflops(config.precision, config.peak_tflops)
        progress = self._progress(step)
        status = "FINISHED"
        try:
            if self.validator is not None and self.validator.missed(step):
                self._validate(step, tracker)  # the previous job stopped on a due step before validating it
            while step < config.optim.max_steps:
                wait_started = time.perf_counter()
                micro_batches = self._next_micro_batches(accumulation)
                data_wait = time.perf_counter() - wait_started
                flops_per_step = self._step_flops(micro_batches)
                step_started = time.perf_counter()
                # Dropout and drop-path draw from a generator seeded by (seed, step, rank): a resumed run replays
                # them exactly, whatever else consumed random numbers since the checkpoint.
                torch.manual_seed(step_seed(config.seed, step, self.context.rank))
                metrics = self.train_step(micro_batches, step)
                step += 1
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
                    epoch=float(self.epoch),
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
                    self._save(step, run_id)
                if stopping:
                    status = "KILLED"
                    if self.context.is_main:
                        print(f"stopping at step {step}: {stop.reason}; checkpoint saved, exiting 0", flush=True)
                    break
        except BaseException:
            tracker.finish("FAILED")
            raise
        finally:
            stop.uninstall()
            if progress is not None:
                progress.close()
        if self.validator is not None and self.validator.best_value is not None:
            tracker.log_metrics({f"best/{self.validator.metric}": self.validator.best_value}, step)
            tracker.set_tags({"best_step": self.validator.best_step, "best_model": str(self.validator.best_dir)})
        tracker.finish(status)
        if self.context.is_main and status == "FINISHED":
            print(f"training finished at step {step}; checkpoints in {checkpoint_dir}", flush=True)
        return 0

    def _save(self, step: int, run_id: str | None) -> None:
        client_state = {
            "step": step,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "mlflow_run_id": run_id,
        }
        if self.validator is not None:
            client_state["validation"] = self.validator.state_dict()
        save_checkpoint(
            self.engine,
            self.config.checkpoint.dir,
            step,
            client_state,
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
            print(
                f"validation at step {step}: {validator.metric}={metrics[validator.metric]:.4f} ({best}) "
                + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())),
                flush=True,
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
        print(f"step {step} " + " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())), flush=True)
