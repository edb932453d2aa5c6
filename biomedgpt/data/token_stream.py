"""Streamed token rows (``biomedgpt-convert --kind documents``) for causal-LM training.

mosaicml-streaming shuffles, partitions the rows across ranks and workers and resumes mid-epoch (the loader's
``state_dict``), as for the BiomedGPT data; a batch is the rows padded to the longest (only a corpus's last packed
row is shorter), with the padding masked out of attention and loss.

Rows converted with ``--keep-document-ids`` carry each token's document; the collator then gives position ids that
restart at every document (and at the padding). Transformers reads restarting position ids without an attention
mask as packed sequences and keeps attention inside each (``masking_utils.find_packed_sequence_indices``), so no
token attends to another document and each document is positioned as if it were alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from biomedgpt.data.parquet_shards import register_parquet_reader

__all__ = ["IGNORE_INDEX", "TokenCollator", "TokenStream", "document_position_ids", "token_row"]

IGNORE_INDEX = -100  # labels that no loss is computed for (padding)


class TokenStream(StreamingDataset):
    """A ``StreamingDataset`` of token rows: each sample is ``{"input_ids": int64 array}``."""

    def __init__(self, local: str, remote: str | None = None, **streaming_kwargs: Any) -> None:
        register_parquet_reader()
        super().__init__(local=local, remote=remote, **streaming_kwargs)

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray]:
        row = super().get_item(sample_id, retry)
        return token_row(row)


def token_row(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """A stored row as the collator takes it: ``input_ids`` and, when the conversion kept them, ``document_ids``."""
    out = {"input_ids": np.asarray(row["input_ids"], dtype=np.int64)}
    if row.get("document_ids") is not None:
        out["document_ids"] = np.asarray(row["document_ids"], dtype=np.int64)
    return out


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counted from each run of equal document ids (a new document, or the padding, restarts at 0)."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


@dataclass
class TokenCollator:
    """Rows -> ``input_ids`` and ``attention_mask`` [B, T] padded with ``pad_id``, and ``labels`` [B, T] (the
    tokens, :data:`IGNORE_INDEX` on padding; the model predicts ``labels[:, 1:]`` from ``input_ids[:, :-1]``).
    Rows with ``document_ids`` (and ``mask_documents``) also give ``position_ids`` that restart at each document."""

    pad_id: int
    mask_documents: bool = True

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            tokens = torch.from_numpy(row["input_ids"])
            input_ids[index, : len(tokens)] = tokens
            attention_mask[index, : len(tokens)] = 1
        labels = input_ids.masked_fill(attention_mask.eq(0), IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.mask_documents and all("document_ids" in row for row in rows):
            documents = torch.full((len(rows), width), -1, dtype=torch.long)  # the padding: a run of its own
            for index, row in enumerate(rows):
                documents[index, : len(row["document_ids"])] = torch.from_numpy(row["document_ids"])
            batch["position_ids"] = document_position_ids(documents)
        return batch
