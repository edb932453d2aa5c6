"""Data pipeline: TSV -> Parquet conversion and a Parquet shard reader for mosaicml-streaming.

The datasets of :mod:`biomedgpt.data.pipeline` register the ``parquet`` shard format with mosaicml-streaming when
they are built; before a plain ``streaming.StreamingDataset(local=DIR)`` over a converted directory, call
:func:`register_parquet_reader` (importing this package does not import streaming, which costs seconds). Call
:func:`biomedgpt.runtime.apply_distributed_env` before building a dataset so streaming sees ``LOCAL_WORLD_SIZE``
and friends whatever launcher started the rank.
"""

from biomedgpt.data.parquet_shards import register_parquet_reader

__all__ = ["register_parquet_reader"]
