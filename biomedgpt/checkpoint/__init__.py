"""Checkpoint utilities: ZeRO consolidation to Hugging Face format and checkpoint import.

Names are imported lazily (on first use), so importing one tool does not load the others' dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule that defines it
_LAZY: dict[str, str] = {
    "ConfigBuilder": "consolidate",
    "ConsolidationError": "errors",
    "ZeroCheckpoint": "consolidate",
    "consolidate_checkpoint": "consolidate",
    "verify_consolidated": "consolidate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
