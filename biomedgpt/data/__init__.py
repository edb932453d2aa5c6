"""Data pipeline: TSV -> Parquet conversion and a Parquet shard reader for mosaicml-streaming.

Importing this package registers the ``parquet`` shard format with mosaicml-streaming, so a plain
``streaming.StreamingDataset(local=DIR)`` over a converted directory yields its rows.
"""
