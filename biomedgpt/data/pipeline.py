"""Streamed training data: converted Parquet shards -> examples -> model batches.

The vision-language rows drive the epoch and are streamed by mosaicml-streaming (its shuffling, partitioning
across ranks and workers, mid-epoch ``state_dict`` and elastic resumption). The auxiliary sources (text, image,
detection) are not streamed on their own: the rows that go with a vision-language sample are chosen by index from
a per-epoch permutation, so a resumed or re-sharded run rebuilds exactly the same examples. The original mixes by
the same rule (UnifyDataset.__getitem__ in BiomedGPT data/pretrain_data/unify_dataset.py): after every 8th
vision-language row of a reader, 2 text, 1 image and 1 detection example.
All randomness (augmentation, masking, negatives, patch choice) is drawn from ``rng_for(seed, epoch, sample id)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from biomedgpt.data.examples import Example, collate
from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder
from biomedgpt.data.parquet_shards import register_parquet_reader
from biomedgpt.data.pretrain_tasks import IMAGE_TEXT_TASKS, PretrainExampleBuilder
from biomedgpt.data.transforms import rng_for


@dataclass
class MixtureConfig:
    """How many auxiliary examples come with every ``period`` vision-language rows (default 8: 2/1/1)."""

    period: int = 8
    text: int = 2
    image: int = 1
    detection: int = 1

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ValueError(f"mixture period must be >= 1, got {self.period}")
        for name in ("text", "image", "detection"):
            if getattr(self, name) < 0:
                raise ValueError(f"mixture.{name} must be >= 0, got {getattr(self, name)}")


def _current_epoch(dataset: Any) -> int:
    """Epoch being iterated: streaming pre-increments its shared ``next_epoch`` when an epoch starts."""
    return max(int(dataset.next_epoch) - 1, 0)


class RandomAccessRows:
    """Rows of a converted directory by index (auxiliary sources), through a streaming dataset."""

    def __init__(self, local: str, remote: str | None = None, **kwargs: Any) -> None:
        register_parquet_reader()
        self.dataset = StreamingDataset(local=local, remote=remote, shuffle=False, **kwargs)
        self.size = int(self.dataset.num_samples)
        if self.size == 0:
            raise ValueError(f"{remote or local}: the converted dataset has no rows")

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs per dataset object
    def permutation(self, seed: int, epoch: int, name: str) -> np.ndarray:
        return rng_for(seed, epoch, name, "auxiliary-order").permutation(self.size)

    def row(self, position: int, seed: int, epoch: int, name: str) -> dict[str, Any]:
        order = self.permutation(seed, epoch, name)
        return self.dataset[int(order[position % self.size])]


def _remote(remote_root: str | None, name: str) -> str | None:
    return None if remote_root is None else f"{remote_root.rstrip('/')}/{name}"


class PretrainStream(StreamingDataset):
    """A ``StreamingDataset`` of lists of pretraining examples (one list per vision-language row).

    Paths are local directories of converted shards; with ``remote_root`` they are cache directories and the
    shards come from ``remote_root/<name>`` (any remote mosaicml-streaming supports).
    ``streaming_kwargs`` go to ``StreamingDataset`` (batch_size, shuffle, num_canonical_nodes, ...).
    """

    def __init__(
        self,
        builder: PretrainExampleBuilder,
        vision_language: str,
        text: str | None = None,
        image: str | None = None,
        detection: str | None = None,
        mixture: MixtureConfig | None = None,
        seed: int = 0,
        remote_root: str | None = None,
        **streaming_kwargs: Any,
    ) -> None:
        register_parquet_reader()
        super().__init__(local=vision_language, remote=_remote(remote_root, "vision_language"), **streaming_kwargs)
        self.builder = builder
        self.mixture = mixture or MixtureConfig()
        self.seed = seed
        self.auxiliary: dict[str, RandomAccessRows] = {}
        for name, local in (("text", text), ("image", image), ("detection", detection)):
            if local is not None and getattr(self.mixture, name) > 0:
                self.auxiliary[name] = RandomAccessRows(local, _remote(remote_root, name))

    def get_item(self, sample_id: int, retry: int = 7) -> list[Example]:
        row = super().get_item(sample_id, retry)
        epoch = _current_epoch(self)
        examples = self.builder.from_vision_language(row, rng_for(self.seed, epoch, sample_id, "vl"))
        if sample_id % self.mixture.period:
            return examples
        draw = sample_id // self.mixture.period
        for name, rows in self.auxiliary.items():
            build = getattr(self.builder, f"from_{name}")
            count = getattr(self.mixture, name)
            for k in range(count):
                position = draw * count + k
                aux_row = rows.row(position, self.seed, epoch, name)
                examples.append(build(aux_row, rng_for(self.seed, epoch, f"{name}:{position}", name)))
        return examples


class FinetuneStream(StreamingDataset):
    """A ``StreamingDataset`` of fine-tuning examples built from the rows of one converted directory."""

    def __init__(
        self,
        builder: FinetuneExampleBuilder,
        local: str,
        remote: str | None = None,
        seed: int = 0,
        train: bool = True,
        **streaming_kwargs: Any,
    ) -> None:
        register_parquet_reader()
        super().__init__(local=local, remote=remote, **streaming_kwargs)
        self.builder, self.seed, self.train = builder, seed, train

    def get_item(self, sample_id: int, retry: int = 7) -> Example:
        row = super().get_item(sample_id, retry)
        rng = rng_for(self.seed, _current_epoch(self), sample_id, self.builder.config.task)
        return self.builder.build(row, rng, train=self.train)


@dataclass
class PretrainCollator:
    """Flattens per-row example lists into the two sub-batches of the original (UnifyDataset.collater): ``v1``
    image-text examples at the patch image size, ``v2`` text/image/detection examples at 256 px (zero images for
    text).

    A micro-batch without auxiliary rows gets a placeholder ``v2`` (one example, no target tokens, weight 0):
    under ZeRO-3 every rank must run the same forwards, whatever rows it drew.
    """

    pad_id: int
    bos_id: int = 0
    eos_id: int = 2
    auxiliary_image_size: int = 256

    def placeholder(self) -> Example:
        return Example(
            "placeholder",
            np.asarray([self.bos_id, self.eos_id], dtype=np.int64),
            np.asarray([self.pad_id], dtype=np.int64),
            np.asarray([self.bos_id], dtype=np.int64),
            weight=0.0,
        )

    def __call__(self, rows: Sequence[list[Example]]) -> dict[str, Any]:
        examples = [ex for row in rows for ex in row]
        image_text = [ex for ex in examples if ex.task in IMAGE_TEXT_TASKS]
        auxiliary = [ex for ex in examples if ex.task not in IMAGE_TEXT_TASKS] or [self.placeholder()]
        if not image_text:
            raise ValueError("a pretraining micro-batch needs at least one vision-language row")
        return {
            # First, so that StreamingDataLoader counts rows (it takes len() of a dict batch's first value) and
            # its state_dict resumes at the right sample.
            "rows": len(rows) * [None],
            "v1": collate(image_text, self.pad_id),
            "v2": collate(auxiliary, self.pad_id, image_size=self.auxiliary_image_size),
        }


@dataclass
class FinetuneCollator:
    pad_id: int
    vocab_size: int | None = None

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        return collate(examples, self.pad_id, vocab_size=self.vocab_size)


def _to_numpy(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.numpy()
    if isinstance(batch, dict):
        return {key: _to_numpy(value) for key, value in batch.items()}
    return batch


def _to_tensors(batch: Any, pin: bool) -> Any:
    if isinstance(batch, np.ndarray):
        tensor = torch.from_numpy(batch)
        return tensor.pin_memory() if pin else tensor
    if isinstance(batch, dict):
        return {key: _to_tensors(value, pin) for key, value in batch.items()}
    return batch


class _NumpyTransport:
    """The collator's batch as numpy arrays, for the trip from a DataLoader worker to the training process.

    A tensor leaves a worker through a new shared-memory segment of its own (torch's file_descriptor sharing), which
    cost more than building the batch: ~10 ms of CPU per batch of 8 prepared 256 px rows, a third of the workers'
    time (benchmarks/data_pipeline.py); numpy arrays travel pickled through the worker's pipe instead.
    """

    def __init__(self, collate_fn: Callable[..., Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Any) -> Any:
        return _to_numpy(self.collate_fn(items))


class BatchLoader(StreamingDataLoader):
    """``StreamingDataLoader`` whose workers send batches as numpy arrays (:class:`_NumpyTransport`); batches come out
    as tensors again, in pinned memory on a GPU machine. ``state_dict`` resumes mid-epoch as before."""

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable[..., Any], num_workers: int = 0) -> None:
        self.pin = torch.cuda.is_available()
        transport = _NumpyTransport(collate_fn) if num_workers > 0 else collate_fn
        super().__init__(
            dataset,
            batch_size=batch_size,
            collate_fn=transport,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self.pin and num_workers == 0,  # worker batches are pinned once they are tensors again
        )

    def __iter__(self) -> Any:
        for batch in super().__iter__():
            yield _to_tensors(batch, self.pin) if self.num_workers > 0 else batch


def make_loader(dataset: Any, batch_size: int, collate_fn: Callable[..., Any], num_workers: int = 0) -> Any:
    """A :class:`BatchLoader` (its ``state_dict`` resumes mid-epoch) over a dataset made above.

    Batches hold uint8 images (normalised on the device); on a GPU machine they come in pinned memory, so the copy to
    the device can overlap the step (the trainer copies with ``non_blocking=True``).
    """
    return BatchLoader(dataset, batch_size, collate_fn, num_workers)
