"""Training examples (source, target, image, weight) and how a list of them becomes a model batch."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from biomedgpt.tokenizer import BiomedGPTTokenizer

_LEADING_PUNCTUATION = ",.!?*#:;~"


def normalize_text(text: str, max_words: int | None = None) -> str:
    """The original's caption/question cleaning: lowercase, drop leading punctuation, '-' and '/' become
    spaces, collapse whitespace, keep at most ``max_words`` words."""
    text = text.lower().lstrip(_LEADING_PUNCTUATION).replace("-", " ").replace("/", " ")
    text = re.sub(r"\s{2,}", " ", text).strip()
    if max_words is not None:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


@dataclass
class Example:
    """One seq2seq example. ``source`` holds [bos] ... [eos]; ``target`` ends with eos; ``prev_output`` is
    [bos] + target[:-1] (pad in ``target`` marks positions without loss, e.g. a forced VQA question prefix)."""

    task: str
    source: np.ndarray
    target: np.ndarray
    prev_output: np.ndarray
    image: torch.Tensor | None = None
    weight: float = 1.0
    code_mask: bool = False
    sample_id: str = ""
    # Per target position, the token ids a trie allows there (None: any token), for trie-constrained training.
    allowed_tokens: list[list[int] | None] | None = None
    # Image patches the encoder keeps (pretraining samples 196 per image), drawn from the sample's own seed.
    patch_indices: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_example(
    tokenizer: BiomedGPTTokenizer,
    task: str,
    source_tokens: Sequence[int],
    target_tokens: Sequence[int],
    image: torch.Tensor | None = None,
    weight: float = 1.0,
    code_mask: bool = False,
    sample_id: str = "",
    **extra: Any,
) -> Example:
    """Wrap as the original does: source = [bos] + src + [eos], target = tgt + [eos], prev = [bos] + tgt."""
    source = np.asarray([tokenizer.bos_id, *source_tokens, tokenizer.eos_id], dtype=np.int64)
    target = np.asarray([*target_tokens, tokenizer.eos_id], dtype=np.int64)
    prev_output = np.asarray([tokenizer.bos_id, *target_tokens], dtype=np.int64)
    return Example(task, source, target, prev_output, image, weight, code_mask, sample_id, extra=extra)


def _pad(rows: Sequence[np.ndarray], pad_id: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def collate(
    examples: Sequence[Example],
    pad_id: int,
    image_size: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Pad a list of examples into one model batch.

    Examples without an image get a zero image and ``patch_masks=False`` (their patches are masked in the
    encoder). With no image at all in the batch (and no ``image_size``), ``patch_images`` is None (text only).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    images = [ex.image for ex in examples]
    shapes = {tuple(img.shape) for img in images if img is not None}
    if len(shapes) > 1:
        raise ValueError(f"images of one sub-batch must share a size, got {sorted(shapes)}")
    patch_images = None
    if shapes or image_size is not None:
        shape = next(iter(shapes)) if shapes else (3, image_size, image_size)
        patch_images = torch.stack([img if img is not None else torch.zeros(shape) for img in images])
    batch: dict[str, Any] = {
        "input_ids": _pad([ex.source for ex in examples], pad_id),
        "patch_images": patch_images,
        "patch_masks": torch.tensor([img is not None for img in images]),
        "decoder_input_ids": _pad([ex.prev_output for ex in examples], pad_id),
        "target": _pad([ex.target for ex in examples], pad_id),
        "code_masks": torch.tensor([ex.code_mask for ex in examples]),
        "weights": torch.tensor([ex.weight for ex in examples], dtype=torch.float32),
        "tasks": [ex.task for ex in examples],
        "sample_ids": [ex.sample_id for ex in examples],
    }
    batch["ntokens"] = int(batch["target"].ne(pad_id).sum())
    patch_indices = [ex.patch_indices for ex in examples]
    if all(p is not None for p in patch_indices):
        if len({len(p) for p in patch_indices}) > 1:  # type: ignore[arg-type]
            raise ValueError("examples of one sub-batch must keep the same number of image patches")
        batch["patch_indices"] = torch.from_numpy(np.stack(patch_indices)).long()  # type: ignore[arg-type]
    if any(ex.allowed_tokens is not None for ex in examples):
        if vocab_size is None:
            raise ValueError("vocab_size is needed to build constraint masks")
        target = batch["target"]
        masks = torch.ones(*target.shape, vocab_size, dtype=torch.bool)
        for row, ex in enumerate(examples):
            for position, allowed in enumerate(ex.allowed_tokens or []):
                if allowed is None:
                    continue
                masks[row, position] = False
                masks[row, position, allowed] = True
        batch["constraint_masks"] = masks
    return batch
