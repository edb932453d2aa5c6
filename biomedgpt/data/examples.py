"""Training examples (source, target, image, weight) and how a list of them becomes a model batch."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from biomedgpt.data.images import DEFAULT_MEAN, DEFAULT_STD
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
    # How a uint8 ``image`` is normalised on the device: ``(pixel / 255 - mean) / std`` per channel, then the block
    # ``image_blank = (top, bottom, left, right)`` set to 0 (image infilling's masked centre).
    image_mean: tuple[float, float, float] = DEFAULT_MEAN
    image_std: tuple[float, float, float] = DEFAULT_STD
    image_blank: tuple[int, int, int, int] | None = None


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

    uint8 images (the training pipelines') stay uint8: ``patch_images`` is ``[B, 3, H, W]`` uint8 (grey ones
    repeated to three channels here, the first point where the model's three are needed), with ``image_mean``,
    ``image_std`` ``[B, 3]`` and ``image_blank`` ``[B, 4]`` for :func:`images_on_device`, which the training device
    runs. Float images (already normalised) are stacked as they are.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    images = [ex.image for ex in examples]
    present = [img for img in images if img is not None]
    sizes = {tuple(img.shape[-2:]) for img in present}
    if len(sizes) > 1:
        raise ValueError(f"images of one sub-batch must share a size, got {sorted(sizes)}")
    raw = bool(present) and all(img.dtype == torch.uint8 for img in present)
    if not raw and {tuple(img.shape) for img in present} - {(3, *size) for size in sizes}:
        raise ValueError("normalised images must be [3, H, W] and of one dtype; uint8 ones are normalised later")
    patch_images = None
    extra: dict[str, torch.Tensor] = {}
    if raw:
        height, width = next(iter(sizes))
        zero = torch.zeros(3, height, width, dtype=torch.uint8)
        patch_images = torch.stack([zero if img is None else img.expand(3, height, width) for img in images])
        extra = {
            "image_mean": torch.tensor([ex.image_mean for ex in examples], dtype=torch.float32),
            "image_std": torch.tensor([ex.image_std for ex in examples], dtype=torch.float32),
            # A missing image normalises to 0 everywhere, as the zero image of normalised batches.
            "image_blank": torch.tensor(
                [(0, height, 0, width) if ex.image is None else ex.image_blank or (0, 0, 0, 0) for ex in examples],
                dtype=torch.int32,
            ),
        }
    elif sizes or image_size is not None:
        shape = (3, *next(iter(sizes))) if sizes else (3, image_size, image_size)
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
    batch.update(extra)
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


RAW_IMAGE_KEYS = ("image_mean", "image_std", "image_blank")


def images_on_device(batch: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A collated batch (already on the training device) with uint8 ``patch_images`` normalised there.

    ``(pixel / 255 - mean) / std`` in float32, the same IEEE operations as
    :func:`biomedgpt.data.images.normalize_image` (so bit-identical to normalising in the workers), then each
    example's ``image_blank`` block set to 0, then the cast to ``dtype`` (e.g. bf16). Batches whose images are
    already float pass through (cast to ``dtype`` if given). Returns a new dict without the helper keys.
    """
    images = batch.get("patch_images")
    out = {key: value for key, value in batch.items() if key not in RAW_IMAGE_KEYS}
    if images is None:
        return out
    if images.dtype == torch.uint8:
        mean = batch["image_mean"].to(images.device)[:, :, None, None]
        std = batch["image_std"].to(images.device)[:, :, None, None]
        images = (images.to(torch.float32) / 255.0 - mean) / std
        # Blank each example's block with a mask built on the device: reading the blocks back to the host (a loop
        # of slices) would make every step wait for the GPU.
        top, bottom, left, right = batch["image_blank"].to(images.device).unbind(1)
        rows = torch.arange(images.shape[-2], device=images.device)
        cols = torch.arange(images.shape[-1], device=images.device)
        in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # [B, H]
        in_cols = (cols >= left[:, None]) & (cols < right[:, None])  # [B, W]
        images = images.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
    if dtype is not None:
        images = images.to(dtype)
    out["patch_images"] = images
    return out
