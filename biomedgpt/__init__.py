"""BiomedGPT-Train: pretraining and fine-tuning of BiomedGPT vision-language models.

Public names are imported lazily so that light commands (the tokenizer CLI) do not pay for importing transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "BiomedGPTConfig": "biomedgpt.model",
    "BiomedGPTForConditionalGeneration": "biomedgpt.model",
    "BiomedGPTTokenizer": "biomedgpt.tokenizer",
    "DecodingConfig": "biomedgpt.model",
    "Trie": "biomedgpt.trie",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'biomedgpt' has no attribute {name!r}")
