"""Parquet shards for mosaicml-streaming: writer, ``index.json``, and a ``parquet`` shard reader.

Upstream streaming only reads MDS, JSONL and CSV/TSV shards; readers are looked up by the ``format`` field of each
shard entry in ``index.json`` (``streaming.base.format._readers``). We add a reader for ``format: "parquet"``.

Registration is one explicit call, :func:`register_parquet_reader`, which the datasets of
:mod:`biomedgpt.data.pipeline` make when they are built (a plain ``streaming.StreamingDataset`` over converted shards
needs it first). The reader class (:data:`ParquetReader`) is built on first use, because ``import streaming`` takes
~6 s (it imports torch, torchvision and transformers) and the converter, which only *writes* shards, should not pay
that; it is importable by name (pickling for DataLoader workers started with ``spawn`` works).

Shard entry in ``index.json`` (version 2, as streaming expects; extra keys are ours)::

    {"version": 2, "format": "parquet", "compression": null, "hashes": ["sha1"], "size_limit": null,
     "samples": 2048, "raw_data": {"basename": "shard.00000.parquet", "bytes": 123, "hashes": {"sha1": "..."}},
     "zip_data": null, "row_groups": [128, 128, ...], "columns": {"uniq_id": "string", ...},
     "source_lines": [first, last]}

Reading: a sample index is mapped to (row group, offset) from ``row_groups``; the decoded row group (an Arrow
table) goes into a per-process LRU cache bounded in bytes (``BIOMEDGPT_PARQUET_CACHE_MB``, default 256), so
neighbouring samples do not re-read and re-decompress it. The file is opened per row-group read and closed at once,
so streaming's cache eviction really frees disk space, and a missing file raises ``FileNotFoundError``, which is
how streaming knows to (re)download a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "FORMAT_NAME",
    "INDEX_BASENAME",
    "ParquetShardWriter",
    "ShardInfo",
    "ShardSink",
    "iter_rows",
    "rejection_failure",
    "read_index",
    "register_parquet_reader",
    "shard_basename",
    "shard_index_entry",
    "write_index",
]

FORMAT_NAME = "parquet"
INDEX_BASENAME = "index.json"
HASH_ALGO = "sha1"  # one of streaming's hash names, so `StreamingDataset(validate_hash="sha1")` can check shards


# A row group is the unit a random read decodes: with radiograph-sized images (1-4 MB each) 128 rows would make a
# single-row read decompress hundreds of megabytes and overflow the row-group cache, so row groups also close at this
# many bytes of row data.
DEFAULT_ROW_GROUP_BYTES = 8 << 20


def shard_basename(shard_id: int) -> str:
    return f"shard.{shard_id:05d}.parquet"


# ----------------------------------------------------------------------------------------------------- writing


@dataclass
class ShardInfo:
    """What the index needs to know about one finished shard file."""

    basename: str
    bytes: int
    sha1: str
    samples: int
    row_groups: list[int]
    first_line: int | None = None
    last_line: int | None = None
    columns: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardInfo:
        return cls(**obj)


def _file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ParquetShardWriter:
    """Write rows (dicts) to one Parquet shard: zstd, row groups of ``row_group_rows`` rows or ``row_group_bytes``
    bytes of text and binary values (whichever comes first; None: rows only), atomic rename on :meth:`close`.

    The file is written as ``<name>.tmp`` and renamed only when complete, so a crash never leaves a file that looks
    finished; the converter's re-run logic relies on that.
    """

    def __init__(
        self,
        path: str,
        schema: pa.Schema,
        row_group_rows: int = 128,
        compression_level: int | None = None,
        row_group_bytes: int | None = DEFAULT_ROW_GROUP_BYTES,
    ) -> None:
        if row_group_rows < 1:
            raise ValueError("row_group_rows must be >= 1")
        if row_group_bytes is not None and row_group_bytes < 1:
            raise ValueError("row_group_bytes must be >= 1 (or None)")
        self.row_group_bytes = row_group_bytes
        self._pending_bytes = 0
        self.path = path
        self.tmp_path = path + ".tmp"
        self.schema = schema
        self.row_group_rows = row_group_rows
        self._pending: list[dict[str, Any]] = []
        self._row_groups: list[int] = []
        self._lines: list[int] = []
        string_cols = [f.name for f in schema if pa.types.is_string(f.type)]
        self._writer = pq.ParquetWriter(
            self.tmp_path,
            schema,
            compression="zstd",
            compression_level=compression_level,
            # Dictionaries help repeated short strings (dataset_name, type); images are unique blobs.
            use_dictionary=string_cols,
            # Min/max statistics of image bytes or long texts are useless; source_line stats help find a line.
            write_statistics=["source_line"],
        )

    def write(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        self._pending_bytes += sum(len(v) for v in row.values() if isinstance(v, (bytes, str)))
        full = self.row_group_bytes is not None and self._pending_bytes >= self.row_group_bytes
        if full or len(self._pending) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_pylist(self._pending, schema=self.schema)
        # One write_table call with row_group_size >= len(rows) makes exactly one row group.
        self._writer.write_table(table, row_group_size=len(self._pending))
        self._row_groups.append(len(self._pending))
        self._lines.extend((self._pending[0]["source_line"], self._pending[-1]["source_line"]))
        self._pending = []
        self._pending_bytes = 0

    @property
    def samples(self) -> int:
        return sum(self._row_groups) + len(self._pending)

    def close(self) -> ShardInfo:
        """Finish the file, rename it into place, and describe it."""
        self._flush()
        self._writer.close()
        os.replace(self.tmp_path, self.path)
        return ShardInfo(
            basename=os.path.basename(self.path),
            bytes=os.path.getsize(self.path),
            sha1=_file_sha1(self.path),
            samples=sum(self._row_groups),
            row_groups=list(self._row_groups),
            first_line=self._lines[0] if self._lines else None,
            last_line=self._lines[-1] if self._lines else None,
            columns={f.name: str(f.type) for f in self.schema},
        )

    def abort(self) -> None:
        """Drop the partial file (strict-mode failure, exceptions)."""
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def __enter__(self) -> ParquetShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


class ShardSink:
    """Rows -> shards of at most ``rows_per_shard`` rows in ``directory`` (``shards`` lists those closed)."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int, row_group_rows: int) -> None:
        self.directory, self.schema = directory, schema
        self.rows_per_shard, self.row_group_rows = rows_per_shard, row_group_rows
        self.shards: list[ShardInfo] = []
        self.writer: ParquetShardWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            path = self.directory / shard_basename(len(self.shards))
            self.writer = ParquetShardWriter(str(path), self.schema, row_group_rows=self.row_group_rows)
        self.writer.write(row)
        if self.writer.samples >= self.rows_per_shard:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None

    def discard(self) -> None:
        """After a failed conversion: abort the open shard and remove the staging ``directory`` (this sink's own
        folder: nothing else is in it)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.directory.exists():
            shutil.rmtree(self.directory)


def rejection_failure(kept: int, read: int, rejected: dict[str, int], noun: str, max_reject_ratio: float) -> str | None:
    """Why a conversion that kept ``kept`` of ``read`` items (``rejected``: count by reason) cannot be used, or None:
    nothing kept, or more than ``max_reject_ratio`` of them rejected. ``noun`` names the items (singular)."""
    total = sum(rejected.values())
    reasons = ", ".join(f"{reason}: {count}" for reason, count in rejected.items())
    if kept == 0:
        return f"no {noun} kept of {read} read ({reasons or 'no input'})"
    if read and total / read > max_reject_ratio:
        return f"{total} of {read} {noun}s rejected ({reasons}), more than max_reject_ratio={max_reject_ratio}"
    return None


def shard_index_entry(info: ShardInfo) -> dict[str, Any]:
    """The streaming ``index.json`` entry (version 2) for one Parquet shard."""
    return {
        "version": 2,
        "format": FORMAT_NAME,
        "compression": None,  # Parquet compresses its pages itself (zstd); no outer zip file
        "hashes": [HASH_ALGO],
        "size_limit": None,
        "samples": info.samples,
        "raw_data": {"basename": info.basename, "bytes": info.bytes, "hashes": {HASH_ALGO: info.sha1}},
        "zip_data": None,
        "row_groups": list(info.row_groups),
        "columns": dict(info.columns),
        "source_lines": [info.first_line, info.last_line],
    }


def write_index(out_dir: str, shards: Iterable[ShardInfo], meta: dict[str, Any]) -> str:
    """Write ``index.json`` atomically: streaming's fields plus our conversion metadata under ``biomedgpt``."""
    obj = {"version": 2, "shards": [shard_index_entry(s) for s in shards if s.samples], "biomedgpt": meta}
    path = os.path.join(out_dir, INDEX_BASENAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    return path


def read_index(out_dir: str) -> dict[str, Any]:
    with open(os.path.join(out_dir, INDEX_BASENAME)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------- reading


def iter_rows(data_dir: str | os.PathLike[str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a converted dataset directory (``index.json`` + Parquet shards) in order, without streaming's
    partitioning (evaluation and validation read a split whole); a ValueError names what is wrong."""
    directory = Path(data_dir)
    if not (directory / INDEX_BASENAME).is_file():
        raise ValueError(f"{directory}: not a converted dataset (no {INDEX_BASENAME}); run biomedgpt-convert first")
    produced = 0
    for shard in read_index(str(directory)).get("shards", []):
        if shard.get("format") != "parquet":
            raise ValueError(f"{directory}: unsupported shard format {shard.get('format')!r}")
        path = directory / shard["raw_data"]["basename"]
        if not path.is_file():
            raise ValueError(f"{path}: shard listed in {INDEX_BASENAME} is missing")
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            for row in parquet.read_row_group(group).to_pylist():
                if limit is not None and produced >= limit:
                    return
                produced += 1
                yield row


class _RowGroupCache:
    """Process-wide LRU of decoded row groups, bounded by Arrow buffer bytes.

    Process-wide rather than per shard so memory stays bounded however many shards a dataset has. Keys include the
    file's size and hash from the index, so a re-converted file at the same path is never served stale.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # streaming reads from a thread pool for prefetching

    def get(self, key: tuple) -> pa.Table | None:
        with self._lock:
            table = self._items.get(key)
            if table is not None:
                self._items.move_to_end(key)
            return table

    def put(self, key: tuple, table: pa.Table) -> None:
        size = table.nbytes
        with self._lock:
            if key in self._items:
                return
            self._items[key] = table
            self._bytes += size
            # Always keep the newest entry, even if it alone exceeds the budget.
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


ROW_GROUP_CACHE = _RowGroupCache(int(float(os.environ.get("BIOMEDGPT_PARQUET_CACHE_MB", "256")) * (1 << 20)))


def _table_row(table: pa.Table, offset: int) -> dict[str, Any]:
    return table.slice(offset, 1).to_pylist()[0]


def _build_reader_class() -> type:
    # Imported here, not at module level: importing streaming costs seconds (see module docstring).
    from streaming.base.format.base.reader import FileInfo, JointReader

    class ParquetReader(JointReader):
        """Random access to the rows of one Parquet shard written by :class:`ParquetShardWriter`."""

        def __init__(
            self,
            dirname: str,
            split: str | None,
            compression: str | None,
            hashes: list[str],
            raw_data: FileInfo,
            samples: int,
            size_limit: int | str | None,
            zip_data: FileInfo | None,
            row_groups: Sequence[int],
            columns: dict[str, str] | None = None,
        ) -> None:
            super().__init__(dirname, split, compression, hashes, raw_data, samples, size_limit, zip_data)
            if sum(row_groups) != samples:
                raise ValueError(
                    f"{raw_data.basename}: index.json says {samples} samples but row groups sum to {sum(row_groups)}"
                )
            self.row_groups = list(row_groups)
            self.columns = dict(columns or {})
            starts = [0]
            for n in self.row_groups[:-1]:
                starts.append(starts[-1] + n)
            self._rg_starts = starts
            self._cache_key = (raw_data.basename, raw_data.bytes, raw_data.hashes.get(HASH_ALGO, ""))

        @classmethod
        def from_json(cls, dirname: str, split: str | None, obj: dict[str, Any]) -> ParquetReader:
            if obj.get("version") != 2:
                raise ValueError(f"unsupported streaming shard version {obj.get('version')!r}; expected 2")
            if obj.get("format") != FORMAT_NAME:
                raise ValueError(f"shard format {obj.get('format')!r} is not {FORMAT_NAME!r}")
            zip_data = obj.get("zip_data")
            return cls(
                dirname=dirname,
                split=split,
                compression=obj.get("compression"),
                hashes=list(obj.get("hashes") or []),
                raw_data=FileInfo(**obj["raw_data"]),
                samples=int(obj["samples"]),
                size_limit=obj.get("size_limit"),
                zip_data=FileInfo(**zip_data) if zip_data else None,
                row_groups=obj.get("row_groups") or [int(obj["samples"])],
                columns=obj.get("columns"),
            )

        def validate(self, allow_unsafe_types: bool) -> None:
            # Parquet holds no pickled objects, so there is nothing unsafe to refuse.
            return None

        @property
        def filename(self) -> str:
            return os.path.join(self.dirname, self.split, self.raw_data.basename)

        def _locate(self, idx: int) -> tuple[int, int]:
            if not 0 <= idx < self.samples:
                raise IndexError(f"sample {idx} out of range for shard {self.raw_data.basename} ({self.samples})")
            rg = bisect_right(self._rg_starts, idx) - 1
            return rg, idx - self._rg_starts[rg]

        def _row_group(self, rg: int) -> pa.Table:
            key = (os.path.abspath(self.filename), *self._cache_key, rg)
            table = ROW_GROUP_CACHE.get(key)
            if table is None:
                # Open, read, close: raises FileNotFoundError when evicted (streaming then re-downloads it).
                with open(self.filename, "rb") as f:
                    table = pq.ParquetFile(f).read_row_group(rg)
                ROW_GROUP_CACHE.put(key, table)
            return table

        def get_item(self, idx: int) -> dict[str, Any]:
            rg, offset = self._locate(idx)
            return _table_row(self._row_group(rg), offset)

        def get_sample_data(self, idx: int) -> bytes:
            """One row as Arrow IPC stream bytes (only for callers of the generic Reader API)."""
            rg, offset = self._locate(idx)
            row = self._row_group(rg).slice(offset, 1)
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, row.schema) as writer:
                writer.write_table(row)
            return sink.getvalue()

        def decode_sample(self, data: bytes) -> dict[str, Any]:
            return pa.ipc.open_stream(data).read_all().to_pylist()[0]

        def __iter__(self) -> Iterator[dict[str, Any]]:
            # Sequential reading decodes each row group once instead of looking every row up.
            for rg in range(len(self.row_groups)):
                yield from self._row_group(rg).to_pylist()

    # Make pickling by reference find the class (DataLoader workers started with spawn unpickle shard readers).
    ParquetReader.__module__ = __name__
    ParquetReader.__qualname__ = "ParquetReader"
    return ParquetReader


_reader_class: type | None = None
_reader_lock = threading.Lock()


def get_reader_class() -> type:
    """The ``ParquetReader`` class (a subclass of streaming's ``JointReader``); imports streaming."""
    global _reader_class
    with _reader_lock:
        if _reader_class is None:
            _reader_class = _build_reader_class()
    return _reader_class


def __getattr__(name: str) -> Any:
    if name == "ParquetReader":
        return get_reader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_parquet_reader() -> type:
    """Register the reader under ``format: "parquet"`` in streaming's reader table (idempotent; imports streaming).

    streaming looks a shard's reader up by the ``format`` of its ``index.json`` entry in a module-level table for
    which it has no public function, so the class is written into that table.
    """
    import streaming.base.format as formats

    cls = get_reader_class()
    formats._readers[FORMAT_NAME] = cls
    return cls
