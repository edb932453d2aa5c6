"""Small collectives on host values (flags, token counts, loss sums) that work under every backend.

NCCL moves only CUDA tensors: a CPU tensor handed to ``all_reduce`` on an NCCL process group fails. These helpers
send such values through the current GPU there, and through the CPU under gloo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_ranks", "any_rank", "all_reduce", "communication_device", "distributed"]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def communication_device(group: Any = None) -> torch.device:
    """Where the backend of ``group`` (default: the world) takes tensors from: the current GPU for NCCL."""
    if distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: torch.Tensor, op: Any = None) -> torch.Tensor:
    """COLLECTIVE when distributed: ``values`` reduced over every rank (default: summed), on their own device."""
    if not distributed():
        return values
    device = communication_device()
    moved = values.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM if op is None else op)
    return moved.to(values.device)


def all_ranks(flag: bool) -> bool:
    """COLLECTIVE when distributed: True when ``flag`` holds on every rank."""
    return bool(all_reduce(torch.tensor([int(flag)], dtype=torch.int32), dist.ReduceOp.MIN).item())


def any_rank(flag: bool) -> bool:
    """COLLECTIVE when distributed: True when ``flag`` holds on some rank."""
    return bool(all_reduce(torch.tensor([int(flag)], dtype=torch.int32), dist.ReduceOp.MAX).item())
