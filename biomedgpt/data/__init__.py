"""Data pipeline: TSV -> Parquet conversion and a Parquet shard reader for mosaicml-streaming.

Importing this package registers the ``parquet`` shard format with mosaicml-streaming, so a plain
``streaming.StreamingDataset(local=DIR)`` over a converted directory yields its rows. Registration happens at once
if streaming is already imported, otherwise the moment it is (``import streaming`` costs seconds; the converter does
not need it). Call :func:`~biomedgpt.data.distributed_env.apply_distributed_env` before building a dataset so
streaming sees ``LOCAL_WORLD_SIZE`` and friends whatever launcher started the rank.
"""

from biomedgpt.data.distributed_env import DistributedEnv, apply_distributed_env, detect_distributed_env
from biomedgpt.data.parquet_shards import install_lazy_registration, register_parquet_reader

install_lazy_registration()

__all__ = [
    "DistributedEnv",
    "apply_distributed_env",
    "detect_distributed_env",
    "register_parquet_reader",
]
