"""Streamed conversation shards (``biomedgpt-convert --kind conversations``) as training examples of a vision-language
chat model: the image decoded (PNG/JPEG/DICOM, :func:`biomedgpt.data.images.decode_image`) and prepared by the vision
tower's image processor, the turns rendered by a chat template (:mod:`biomedgpt.data.chat_templates`, loss on the
assistant's tokens), and the image placeholder repeated once per image feature.

mosaicml-streaming shuffles, partitions the rows across ranks and workers and resumes mid-epoch, as for the other
kinds; the example is built in the loader's workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from streaming import StreamingDataset

from biomedgpt.data.chat_templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, ChatTemplateError, Turn, encode_chat
from biomedgpt.data.images import decode_image
from biomedgpt.data.parquet_shards import register_parquet_reader

__all__ = ["ChatExampleBuilder", "ConversationStream", "VisionChatCollator", "image_processor_for"]


def image_processor_for(vision: str | dict[str, Any], image_size: int) -> Any:
    """The image processor of a vision tower directory, or for an inline config CLIP's (resize the shorter side,
    centre crop, CLIP's mean and std) or SigLIP's (resize to the square, mean and std 0.5) at ``image_size``."""
    from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    if isinstance(vision, str):
        return AutoImageProcessor.from_pretrained(vision)
    if vision.get("model_type") == "siglip_vision_model":
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


@dataclass
class ChatExampleBuilder:
    """A stored row -> ``input_ids``, ``labels`` (lists) and ``pixel_values`` ([3, H, W] or None)."""

    tokenizer: Any
    image_processor: Any
    template: str
    image_features: int  # positions one image takes (the placeholder is repeated this often)
    max_length: int
    system: str | None = None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        turns = [Turn(t["role"], t["text"]) for t in row["turns"]]
        try:
            encoded = encode_chat(self.template, turns, self.tokenizer, system=self.system)
        except ChatTemplateError as error:
            raise ChatTemplateError(f"row {row.get('id')} (line {row.get('source_line')}): {error}") from error
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        input_ids, labels = [], []
        for token, label in zip(encoded.input_ids, encoded.labels):
            count = self.image_features if token == image_id else 1
            input_ids += [token] * count
            labels += [label if count == 1 else IGNORE_INDEX] * count
        if image_id in input_ids and input_ids.index(image_id) + self.image_features > self.max_length:
            raise ValueError(
                f"row {row.get('id')}: its image's {self.image_features} positions end after data.max_length="
                f"{self.max_length}; raise data.max_length"
            )
        pixel_values = None
        if row.get("image") is not None:
            image = decode_image(row["image"], str(row.get("image_source") or row.get("id")))
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {
            "input_ids": input_ids[: self.max_length],
            "labels": labels[: self.max_length],
            "pixel_values": pixel_values,
        }


class ConversationStream(StreamingDataset):
    """A ``StreamingDataset`` of conversation shards whose samples are built by ``builder``."""

    def __init__(self, local: str, builder: ChatExampleBuilder, remote: str | None = None, **kwargs: Any) -> None:
        register_parquet_reader()
        super().__init__(local=local, remote=remote, **kwargs)
        self.builder = builder

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        return self.builder(super().get_item(sample_id, retry))


@dataclass
class VisionChatCollator:
    """Examples -> ``input_ids``, ``attention_mask`` and ``labels`` [B, T] (right padding with ``pad_id``, no loss
    there) and ``pixel_values`` [images, 3, H, W] of the rows that have an image, in row order (or no key)."""

    pad_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for index, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[index, :length] = torch.tensor(example["input_ids"])
            labels[index, :length] = torch.tensor(example["labels"])
            attention_mask[index, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [e["pixel_values"] for e in examples if e["pixel_values"] is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
