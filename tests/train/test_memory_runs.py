"""Real 2-rank ZeRO-3 jobs (torchrun, gloo, streamed demo data, MLflow) for the memory switches and bf16 on CPU:

- ``model.activation_checkpointing`` and ``optim.fused_loss``, switched on together, give the plain job's losses and
  gradient norms, step by step, with dropout and drop-path on;
- ``precision=bf16`` trains on DeepSpeed's CPU accelerator, continues exactly after a SIGKILL, and its checkpoint
  consolidates to the fp32 master weights, bit-equal to DeepSpeed's ``zero_to_fp32``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from test_training_runs import crash_after_step
from training_jobs import demo_run_overrides, losses, metric_records, mlflow_runs, run_training

pytestmark = pytest.mark.slow


def run(data_root: Path, run_dir: Path, steps: int, extra: list[str], store: Path | None = None):
    return run_training(run_dir, "demo", demo_run_overrides(data_root, run_dir, steps, extra), 2, store)


def step_records(run_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in metric_records(run_dir) if "loss" in record}


@pytest.fixture(scope="module")
def switch_jobs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, dict]]:
    """3 steps each of the plain job and of the job with both switches on (the fused loss and activation
    checkpointing of the layers and the ResNet): metrics by step, and the store. Each switch alone is compared
    with the plain model exactly, in one process, by test_fused_loss_training.py and
    test_activation_checkpointing.py; here they go through the config into a real 2-rank job, together, which
    costs one job less than a job each and still fails when either changes a loss or a gradient.

    Label smoothing on and a chunk smaller than a micro-batch's target tokens, so every part of the fused path
    runs; neither switch draws random numbers, so dropout and drop-path stay on and must still agree.

    The ResNet's BatchNorm is frozen in both: with batch statistics, BatchNorm and Adam's first steps turn
    rounding-level differences into percent-level gradient differences by step 2. Measured with 2-rank ZeRO-3 on a
    small model: the plain loss on ``logits * 3 / 3`` moves step 2's gradient norm by 0.017% (the fused loss,
    summing in another order, by 0.006%), while with frozen BatchNorm the fused job's norms agree to 1e-7 at every
    step. Trainable BatchNorm under the switches is covered exactly, in one process, by
    test_activation_checkpointing.py and test_fused_loss_training.py."""
    root = tmp_path_factory.mktemp("switch_jobs")
    store = root / "mlruns.db"
    variants = {
        "plain": [],
        "switched": [
            "optim.fused_loss=true", "optim.fused_loss_chunk_size=16", "model.activation_checkpointing=layers+resnet",
        ],
    }  # fmt: skip
    records: dict = {"store": store}
    for name, extra in variants.items():
        run(data_root, root / name, 3, ["optim.label_smoothing=0.1", "model.resnet_norm=frozen", *extra], store)
        records[name] = step_records(root / name)
    assert sorted(records["plain"]) == [1, 2, 3] and records["plain"][1]["loss"] != records["plain"][2]["loss"]
    return records


def assert_same_steps(records: dict, name: str, metrics: tuple[str, ...]) -> None:
    plain = records["plain"]
    assert sorted(records[name]) == sorted(plain), name
    for step in plain:
        for metric in metrics:
            assert records[name][step][metric] == pytest.approx(plain[step][metric], rel=1e-5, abs=1e-7), (
                name, step, metric, records[name][step][metric], plain[step][metric],
            )  # fmt: skip


def test_fused_loss_and_activation_checkpointing_match_the_plain_job(switch_jobs: dict) -> None:
    assert_same_steps(switch_jobs, "switched", ("loss", "objective", "grad_norm"))
    params = [run.data.params for run in mlflow_runs(switch_jobs["store"], "biomedgpt-demo")]
    assert sorted(p["config.model.activation_checkpointing"] for p in params) == ["layers+resnet", "none"]
    assert sorted(p["config.optim.fused_loss"] for p in params) == ["False", "True"]


# Smaller images than the demo's: bf16 convolutions are slow on CPU (no vectorised bf16 kernels on this machine).
BF16 = [
    "precision=bf16", "deepspeed_config=zero3_cpu_bf16.json", "checkpoint.every_steps=2",
    "data.patch_image_size=64", "data.sample_patch_num=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_job(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("bf16") / "reference"
    return run_dir, run(data_root, run_dir, 4, BF16)


def test_bf16_zero3_on_cpu_trains_and_consolidates_the_fp32_master(bf16_job, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from biomedgpt.checkpoint.consolidate import consolidate_checkpoint

    reference_dir, reference = bf16_job
    assert "precision=bf16 on CPU" in reference.stderr  # a warning now, no longer a refusal
    records = step_records(reference_dir)
    assert sorted(records) == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in records.values())  # finite, learning

    # Consolidation reads the fp32 master partitions of the bf16 optimizer, bit-equal to zero_to_fp32.
    ckpt = reference_dir / "ckpt"
    tag = (ckpt / "latest").read_text()
    result = consolidate_checkpoint(ckpt, tmp_path / "consolidated", progress=False)
    assert (result.zero_stage, result.world_size, result.step) == (3, 2, 4)
    written: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "consolidated").glob("model*.safetensors")):
        written.update(load_file(shard))
    deepspeed_state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    assert deepspeed_state
    off_the_bf16_grid = 0
    for name, tensor in deepspeed_state.items():
        mine = written[result.tied.get(name, name)]
        assert mine.dtype == tensor.dtype, name
        assert torch.equal(mine.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)), name
        if tensor.dtype == torch.float32 and not torch.equal(tensor, tensor.bfloat16().float()):
            off_the_bf16_grid += 1
    # The master weights, not the bf16 module copies: after 4 updates they hold values bf16 cannot represent.
    assert off_the_bf16_grid > len(deepspeed_state) // 2, off_the_bf16_grid


def test_bf16_zero3_on_cpu_resumes_after_sigkill(bf16_job, data_root: Path, tmp_path: Path) -> None:
    reference_dir, _ = bf16_job
    killed_dir = tmp_path / "killed"
    crash_after_step(3, data_root, killed_dir, 4, BF16)  # as in test_training_runs, the same command again
    resumed = run(data_root, killed_dir, 4, BF16)
    match = re.search(r"resuming from .* at step (\d+)", resumed.stdout)
    assert match is not None and int(match.group(1)) == 2, resumed.stdout[-3000:]
    continued, expected = losses(killed_dir), losses(reference_dir)
    assert sorted(continued) == [1, 2, 3, 4]
    for step in expected:  # dropout on, bf16 weights: exact continuation needs the restored fp32 master and seeds
        assert continued[step] == pytest.approx(expected[step], rel=1e-5), (step, expected, continued)
