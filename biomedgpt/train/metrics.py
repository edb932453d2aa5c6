"""Throughput, memory and model FLOPs utilisation (MFU) of training steps."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence

import torch

# Dense peak TFLOP/s per GPU by precision (vendor datasheets, no sparsity). fp32 matmuls run as TF32 on these.
DEVICE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 125.0, "fp32": 15.7},
}


def device_peak_tflops(precision: str, override: float | None = None) -> float | None:
    """Peak of this process's device, from the table (None on CPU or an unknown GPU: MFU is then not reported)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision, peaks["fp32"])
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by this process, or the peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def model_flops_utilisation(flops_per_step: float, step_seconds: float, world_size: int, peak_tflops: float | None):
    """Fraction of the devices' peak spent on the model's FLOPs (forward + backward), or None without a peak."""
    if peak_tflops is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_tflops * 1e12 * world_size)


def step_loss_metrics(
    keys: Sequence[str], loss_sums: Sequence[float], token_counts: Sequence[float]
) -> dict[str, float]:
    """The loss metrics of one step from each sub-batch's summed loss and its target tokens (over all ranks).

    ``loss`` is the mean over every target token of the step (total loss / total tokens), so it can be compared
    from step to step whichever sub-batches a step held. What pretraining optimises, ``L_v1/ntok_v1 +
    L_v2/ntok_v2`` (OFA criterions/label_smoothed_cross_entropy.py, two sample lists), is a sum of two per-token
    means: it drops by the whole auxiliary loss on steps without auxiliary examples, so it is logged apart as
    ``objective``. ``loss_<key>`` is logged only on steps where that sub-batch had target tokens (a 0 there would
    read as a perfect prediction). With a single sub-batch (fine-tuning) ``loss`` is the objective.
    """
    if not len(keys) == len(loss_sums) == len(token_counts):
        raise ValueError(f"{len(keys)} sub-batch names, {len(loss_sums)} loss sums, {len(token_counts)} token counts")
    total_tokens = float(sum(token_counts))
    metrics = {"loss": float(sum(loss_sums)) / max(total_tokens, 1.0)}
    if len(keys) > 1:
        present = [(k, float(s), float(n)) for k, s, n in zip(keys, loss_sums, token_counts) if n > 0]
        metrics["objective"] = sum(s / n for _, s, n in present)
        metrics.update({f"loss_{key}": s / n for key, s, n in present})
    return metrics
