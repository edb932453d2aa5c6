"""Peak CPU memory of a piece of work, as torch's allocator sees it (``tracemalloc`` does not see torch's tensors).

Used by the fused-loss benchmark and its tests; a measuring tool, not something training calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_allocated_bytes"]

T = TypeVar("T")


def peak_allocated_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()``'s result and the peak CPU bytes allocated while it ran, above what was allocated when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node: Any = stack.pop()
        if node.typed[0] == torch._C._profiler._EventType.Allocation:
            # total_allocated counts from the profiler's start, so the inputs allocated before are not in it
            peak = max(peak, node.typed[1].total_allocated)
        stack.extend(node.children)
    return result, peak
