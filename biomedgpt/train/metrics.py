"""Throughput, memory and model FLOPs utilisation (MFU) of training steps."""

from __future__ import annotations

import resource
import sys

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
