"""Streamed token rows (``biomedgpt-convert --kind documents``) for causal-LM training.

mosaicml-streaming shuffles, partitions the rows across ranks and workers and resumes mid-epoch (the loader's
``state_dict``), as for the BiomedGPT data; a batch is the rows padded to the longest (only a corpus's last packed
row is shorter), with the padding masked out of attention and loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from biomedgpt.data.parquet_shards import read_index, register_parquet_reader

__all__ = ["IGNORE_INDEX", "TokenCollator", "TokenStream", "token_shards_meta"]

IGNORE_INDEX = -100  # labels that no loss is computed for (padding)


def token_shards_meta(directory: str) -> dict[str, Any]:
    """The conversion settings of a token-shard directory (``seq_len``, ``tokenizer``, ``vocab_size``, ...); a
    ValueError when the directory holds no such conversion."""
    try:
        meta = read_index(directory).get("biomedgpt", {})
    except (OSError, ValueError) as error:
        raise ValueError(
            f"no index.json of biomedgpt-convert there ({error}); convert raw documents with biomedgpt-convert "
            f"--kind documents --out {directory}"
        ) from error
    if meta.get("kind") != "documents":
        raise ValueError(
            f"converted as {meta.get('kind')!r}, not as token rows; convert raw documents with biomedgpt-convert "
            "--kind documents"
        )
    return meta


class TokenStream(StreamingDataset):
    """A ``StreamingDataset`` of token rows: each sample is ``{"input_ids": int64 array}``."""

    def __init__(self, local: str, remote: str | None = None, **streaming_kwargs: Any) -> None:
        register_parquet_reader()
        super().__init__(local=local, remote=remote, **streaming_kwargs)

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray]:
        row = super().get_item(sample_id, retry)
        return {"input_ids": np.asarray(row["input_ids"], dtype=np.int64)}


@dataclass
class TokenCollator:
    """Rows -> ``input_ids`` and ``attention_mask`` [B, T] padded with ``pad_id``, and ``labels`` [B, T] (the
    tokens, :data:`IGNORE_INDEX` on padding; the model predicts ``labels[:, 1:]`` from ``input_ids[:, :-1]``)."""

    pad_id: int

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            tokens = torch.from_numpy(row["input_ids"])
            input_ids[index, : len(tokens)] = tokens
            attention_mask[index, : len(tokens)] = 1
        labels = input_ids.masked_fill(attention_mask.eq(0), IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
