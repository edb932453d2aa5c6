"""Convert a BiomedGPT/OFA TSV file into Parquet shards plus a mosaicml-streaming ``index.json``.

How a run goes:

1. One sequential pass over the input (binary mode, so ``\\r`` and byte offsets are exact, unlike OFA's text-mode
   reader) splits it at ``\\n`` into shards of ``rows_per_shard`` *lines*: shard ``k`` always holds lines
   ``k*R+1 .. (k+1)*R``, whatever is rejected, so a re-run knows which shard holds which lines. The pass also
   hashes each shard's byte range. A ``\\r\\n`` ending is one line ending (the ``\\r`` belongs to the range of its
   line, so offsets and hashes need no special case), and a UTF-8 BOM is dropped from the very start of the file.
2. Shards are converted by a pool of worker processes. Each validates its lines (:func:`schema.parse_row`), writes
   good rows to ``shard.NNNNN.parquet`` (via a ``.tmp`` name, renamed when complete) and bad ones to
   ``_convert/shard.NNNNN.rejects.jsonl``, then writes ``_convert/shard.NNNNN.json`` *last*, as the mark that the
   shard is finished. A re-run skips every shard whose mark matches the options and the hash of its byte range, so
   an interrupted conversion resumes, and fixing a few bad lines in place redoes only their shards.
3. The per-shard records are merged into ``index.json``, ``rejects.jsonl`` (every rejected line with file, line,
   reason, column and detail) and ``conversion_summary.json`` (counts per reason; rows read = written + rejected,
   so no row is lost without being reported).

With ``strict=True`` the first bad row (in file order) stops the conversion with :class:`StrictModeError`, which
names file, line and column; no ``index.json`` is written.

A conversion that keeps no row, or rejects more than ``max_reject_ratio`` of its rows, raises
:class:`TooManyRejectsError` (the CLI exits with status 1) after writing ``rejects.jsonl`` and a summary marked
``failed``, but no ``index.json``: training then stops at once ("no index.json") instead of minutes later on an
empty or mostly-rejected dataset. The finished shards stay, so re-running with a higher limit reuses them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from biomedgpt.data.image_preparation import ImagePreparation, prepare_row, prepared_schema
from biomedgpt.data.parquet_shards import (
    DEFAULT_ROW_GROUP_BYTES,
    INDEX_BASENAME,
    ParquetShardWriter,
    ShardInfo,
    shard_basename,
    write_index,
)
from biomedgpt.data.schema import (
    DEFAULT_MAX_FIELD_CHARS,
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_NOTE,
    SCHEMA_VERSION,
    KindSpec,
    RowError,
    RowOptions,
    get_kind,
    parse_row,
    parse_selected_cols,
)
from biomedgpt.output_dirs import OutputDirError, check_output_dir

__all__ = [
    "REJECTS_BASENAME",
    "SUMMARY_BASENAME",
    "ConversionError",
    "ConversionSummary",
    "ShardPlan",
    "StrictModeError",
    "TooManyRejectsError",
    "convert",
    "plan_shards",
]

REJECTS_BASENAME = "rejects.jsonl"
SUMMARY_BASENAME = "conversion_summary.json"
WORK_DIRNAME = "_convert"  # per-shard marks and rejects; kept so that re-runs can skip finished shards
MANIFEST_BASENAME = "manifest.json"
RAW_PREVIEW_CHARS = 200
DEFAULT_MAX_REJECT_RATIO = 0.5
UTF8_BOM = b"\xef\xbb\xbf"  # what Windows editors (Notepad, Excel's "CSV UTF-8") put before the first line
_SCAN_CHUNK = 16 << 20


class ConversionError(Exception):
    """A problem with the conversion as a whole (bad arguments, unusable output directory)."""


def _where(record: dict[str, Any]) -> str:
    """``file:line: column N (field)`` of a reject record."""
    where = f"{record['file']}:{record['line']}"
    if record.get("column") is not None:
        where += f": column {record['column']}"
        if record.get("field"):
            where += f" ({record['field']})"
    return where


class StrictModeError(ConversionError):
    """``strict=True`` and a row was bad; the message names file, line, column and reason."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        super().__init__(f"{_where(record)}: {record['reason']}: {record['detail']}")


class TooManyRejectsError(ConversionError):
    """No row was kept, or more than ``max_reject_ratio`` were rejected; ``summary`` is the failed run's summary.

    ``rejects.jsonl`` and ``conversion_summary.json`` (with ``failed: true``) are on disk; ``index.json`` is not.
    """

    def __init__(self, message: str, summary: ConversionSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class ShardPlan:
    """Lines ``first_line .. first_line+num_lines-1`` (1-based) at bytes ``[start, end)`` of the input."""

    shard_id: int
    first_line: int
    num_lines: int
    start: int
    end: int
    digest: str


@dataclass
class ConversionSummary:
    input: str
    kind: str
    out: str
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    shards_planned: int = 0
    shards_with_rows: int = 0
    shards_converted: int = 0
    shards_reused: int = 0
    selected_cols: list[int | None] = field(default_factory=list)
    num_cols: int = 0
    rows_per_shard: int = 0
    row_group_rows: int = 0
    row_group_bytes: int | None = DEFAULT_ROW_GROUP_BYTES
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    clip_boxes: bool = False
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO
    rows_clipped: int = 0  # kept rows with a box cut to the image (clip_boxes)
    crlf_lines: int = 0  # lines that ended in \r\n (accepted as line endings)
    utf8_bom: bool = False  # the file started with a UTF-8 BOM (dropped)
    # Kept rows' images by the rule that decoded them (biomedgpt.data.images.decoding_kind), e.g. how many 16-bit
    # PNGs were scaled by their bit depth and which DICOM windows were applied.
    image_decodings: dict[str, int] = field(default_factory=dict)
    # --max-image-side/--max-shorter-side/--image-encoding (biomedgpt.data.image_preparation); {} when off.
    image_preparation: dict[str, Any] = field(default_factory=dict)
    images_prepared: dict[str, int] = field(default_factory=dict)  # resized / re-encoded / kept / grey; bytes in, out
    failed: bool = False  # no row kept or too many rejected; no index.json was written
    failure: str = ""  # why, as TooManyRejectsError says it
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ planning


def plan_shards(path: str, rows_per_shard: int, progress: bool = False) -> list[ShardPlan]:
    """Split ``path`` into line ranges of ``rows_per_shard`` lines, with byte offsets and a hash of each range.

    A final line without ``\\n`` counts as a line. Counting uses numpy over 16 MiB blocks, so the pass runs near
    disk speed even for files with millions of short lines.
    """
    if rows_per_shard < 1:
        raise ConversionError("rows_per_shard must be >= 1")
    plans: list[ShardPlan] = []
    size = os.path.getsize(path)
    hasher = hashlib.blake2b(digest_size=16)
    shard_start = 0  # byte offset where the current shard begins
    lines_in_shard = 0
    lines_before = 0  # lines in finished shards
    pos = 0
    last_byte = b""
    bar = _progress_bar(progress, total=size, unit="B", unit_scale=True, desc="scan")
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            view = memoryview(chunk)
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            used, taken = 0, 0  # bytes of the chunk hashed so far, newlines consumed so far
            while len(newlines) - taken >= rows_per_shard - lines_in_shard:
                taken += rows_per_shard - lines_in_shard
                end = int(newlines[taken - 1]) + 1
                hasher.update(view[used:end])
                used = end
                plans.append(
                    ShardPlan(len(plans), lines_before + 1, rows_per_shard, shard_start, pos + end, hasher.hexdigest())
                )
                lines_before += rows_per_shard
                shard_start, lines_in_shard = pos + end, 0
                hasher = hashlib.blake2b(digest_size=16)
            hasher.update(view[used:])
            lines_in_shard += len(newlines) - taken
            pos += len(chunk)
            last_byte = chunk[-1:]
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if pos != size:
        raise ConversionError(f"{path} changed size while being read")
    if pos > shard_start and last_byte != b"\n":
        lines_in_shard += 1  # last line has no newline
    if lines_in_shard:
        plans.append(ShardPlan(len(plans), lines_before + 1, lines_in_shard, shard_start, pos, hasher.hexdigest()))
    return plans


# ------------------------------------------------------------------------------------------------ workers


@dataclass(frozen=True)
class _Task:
    plan: ShardPlan
    input: str
    display_input: str
    kind: str
    selected_cols: tuple[int | None, ...]
    num_cols: int
    row_group_rows: int
    out: str
    config_key: str
    strict: bool
    compression_level: int | None
    options: RowOptions = RowOptions()
    preparation: ImagePreparation = ImagePreparation()
    row_group_bytes: int | None = DEFAULT_ROW_GROUP_BYTES


def _reject_record(task: _Task, kind: KindSpec, line_no: int, line: bytes, err: RowError) -> dict[str, Any]:
    raw = line[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    if len(raw) > RAW_PREVIEW_CHARS or len(line) > RAW_PREVIEW_CHARS * 4:
        raw = raw[:RAW_PREVIEW_CHARS] + f"... ({len(line)} bytes)"
    return {
        "file": task.display_input,
        "line": line_no,
        "reason": err.reason,
        # 1-based TSV column as a person counts them (`cut -f`), plus the layout field it feeds.
        "column": None if err.tsv_column is None else err.tsv_column + 1,
        "field": None if err.field_index is None else kind.fields[err.field_index].name,
        "detail": err.detail,
        "raw": raw,
    }


def _iter_lines(task: _Task, stats: Counter[str]) -> Iterator[tuple[int, bytes]]:
    """The shard's lines without their endings; counts ``\\r\\n`` endings and a leading BOM in ``stats``."""
    plan = task.plan
    with open(task.input, "rb") as f:
        f.seek(plan.start)
        for i in range(plan.num_lines):
            line = f.readline()
            if line.endswith(b"\r\n"):
                # One \r before the \n is a Windows line ending; any other \r stays for parse_row to reject.
                line = line[:-2]
                stats["crlf_lines"] += 1
            elif line.endswith(b"\n"):
                line = line[:-1]
            if plan.start == 0 and i == 0 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM) :]  # only at the very start of the file: elsewhere it is data
                stats["utf8_bom"] = 1
            yield plan.first_line + i, line
        if f.tell() != plan.end:
            raise ConversionError(f"{task.display_input} changed while being converted (shard {plan.shard_id})")


def _prepares_images(kind: KindSpec, preparation_on: bool) -> bool:
    """Whether a conversion of ``kind`` prepares images (and so writes the original-size columns)."""
    return preparation_on and any(f.parser == "image" for f in kind.fields)


def _prepare(
    row: dict[str, Any], decoded: tuple[Any, Any], preparation: ImagePreparation, counts: Counter[str]
) -> None:
    image, info = decoded
    size_in = len(row["image"])
    done = prepare_row(row, image, info.format, info.decoding.endswith("as stored"), preparation)
    counts["resized"] += done.resized
    counts["re-encoded"] += done.data is not None
    counts["kept as stored"] += done.data is None
    counts["grey, one channel"] += done.grey
    counts["bytes in"] += size_in
    counts["bytes out"] += len(row["image"])
    counts[f"stored as {done.stored_format}"] += 1


def _work_path(out: str, shard_id: int, suffix: str) -> str:
    return os.path.join(out, WORK_DIRNAME, f"shard.{shard_id:05d}{suffix}")


def _convert_shard(task: _Task) -> dict[str, Any]:
    """Convert one shard; returns its mark (also written to disk) or ``{"strict_error": record}``."""
    kind = get_kind(task.kind)
    plan = task.plan
    shard_path = os.path.join(task.out, shard_basename(plan.shard_id))
    rejects_path = _work_path(task.out, plan.shard_id, ".rejects.jsonl")
    counts: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    decodings: Counter[str] = Counter()  # kept rows' images by decoding rule
    prepared: Counter[str] = Counter()
    preparing = _prepares_images(kind, task.preparation.enabled)
    schema = prepared_schema(kind.schema) if preparing else kind.schema
    writer = ParquetShardWriter(
        shard_path, schema, task.row_group_rows, task.compression_level, row_group_bytes=task.row_group_bytes
    )
    try:
        with open(rejects_path + ".tmp", "w") as rejects:
            for line_no, line in _iter_lines(task, stats):
                notes: list[str] = []
                decoded: list[Any] | None = [] if preparing else None
                try:
                    row = parse_row(
                        kind, line, task.selected_cols, task.num_cols, line_no, options=task.options, notes=notes,
                        images_out=decoded,
                    )  # fmt: skip
                except RowError as err:
                    record = _reject_record(task, kind, line_no, line, err)
                    if task.strict:
                        writer.abort()
                        return {"strict_error": record}
                    counts[err.reason] += 1
                    rejects.write(json.dumps(record, ensure_ascii=False) + "\n")
                    continue
                if decoded:
                    _prepare(row, decoded[0], task.preparation, prepared)
                writer.write(row)
                stats["rows_clipped"] += "box_clipped" in notes
                decodings.update(n.removeprefix(IMAGE_NOTE) for n in notes if n.startswith(IMAGE_NOTE))
        if writer.samples:
            info = writer.close()
        else:
            # Nothing valid: no Parquet file (streaming dislikes empty shards), but the mark still records the lines.
            writer.abort()
            if os.path.exists(shard_path):
                os.remove(shard_path)
            info = ShardInfo(shard_basename(plan.shard_id), 0, "", 0, [])
    except BaseException:
        writer.abort()
        raise
    os.replace(rejects_path + ".tmp", rejects_path)
    mark = {
        "config_key": task.config_key,
        "plan": asdict(plan),
        "rows_read": plan.num_lines,
        "rows_written": info.samples,
        "rejects": dict(counts),
        "rows_clipped": stats["rows_clipped"],
        "crlf_lines": stats["crlf_lines"],
        "utf8_bom": bool(stats["utf8_bom"]),
        "image_decodings": dict(decodings),
        "images_prepared": dict(prepared),
        "shard": info.to_json(),
    }
    mark_path = _work_path(task.out, plan.shard_id, ".json")
    with open(mark_path + ".tmp", "w") as f:
        json.dump(mark, f)
    os.replace(mark_path + ".tmp", mark_path)  # written last: its presence means the shard is finished
    return mark


# ------------------------------------------------------------------------------------------------ driver


def _progress_bar(enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


def _config(
    input_path: str,
    kind: KindSpec,
    cols: Sequence[int | None],
    num_cols: int,
    rows_per_shard: int,
    rg_rows: int,
    options: RowOptions,
    preparation: ImagePreparation,
    rg_bytes: int | None,
) -> dict[str, Any]:
    config = {
        "schema_version": SCHEMA_VERSION,
        "input": os.path.abspath(input_path),
        "kind": kind.name,
        "fields": list(kind.field_names),
        "selected_cols": list(cols),
        "num_cols": num_cols,
        "rows_per_shard": rows_per_shard,
        "row_group_rows": rg_rows,
        "row_group_bytes": rg_bytes,
        # They decide which rows are kept, so a shard converted under other limits must be converted again.
        "max_field_chars": options.max_field_chars,
        "max_image_bytes": options.max_image_bytes,
        "clip_boxes": options.clip_boxes,
    }
    if preparation.enabled:  # only then: conversions made without it keep the config they were made with
        config["image_preparation"] = preparation.to_json()
    return config


def _config_key(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _describe(config: dict[str, Any]) -> str:
    return (
        f"{config.get('input')!r} as kind {config.get('kind')!r} (selected_cols={config.get('selected_cols')}, "
        f"num_cols={config.get('num_cols')}, rows_per_shard={config.get('rows_per_shard')}, "
        f"row_group_rows={config.get('row_group_rows')}, row_group_bytes={config.get('row_group_bytes')}, "
        f"max_field_chars={config.get('max_field_chars')}, "
        f"max_image_bytes={config.get('max_image_bytes')}, clip_boxes={config.get('clip_boxes')}, "
        f"image_preparation={config.get('image_preparation', 'off')}, schema_version={config.get('schema_version')})"
    )


def _existing_config(out: str) -> dict[str, Any] | None:
    """The conversion config an output directory already holds (finished or interrupted), if any."""
    index_path = os.path.join(out, INDEX_BASENAME)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                meta = json.load(f).get("biomedgpt")
        except (OSError, ValueError, AttributeError):
            meta = None
        if not isinstance(meta, dict) or "config" not in meta:
            raise ConversionError(
                f"{out} holds an {INDEX_BASENAME} that biomedgpt-convert did not write; "
                "choose an empty or new --out directory"
            )
        return meta["config"]
    manifest = os.path.join(out, WORK_DIRNAME, MANIFEST_BASENAME)
    if os.path.exists(manifest):
        with open(manifest) as f:
            return json.load(f)
    return None


def _shard_files(out: str) -> list[tuple[int, str]]:
    """Our per-shard files in ``out`` (Parquet, temp files, marks, rejects) with their shard numbers."""
    found = []
    paths = glob.glob(os.path.join(out, "shard.*.parquet*")) + glob.glob(os.path.join(out, WORK_DIRNAME, "shard.*"))
    for path in paths:
        try:
            found.append((int(os.path.basename(path).split(".")[1]), path))
        except (IndexError, ValueError):
            continue
    return found


_SHARD_FILE = re.compile(r"^shard\.\d+\.parquet")  # shard_basename's files and their temporary siblings


_OUTPUT_FILES = (INDEX_BASENAME, REJECTS_BASENAME, SUMMARY_BASENAME)


def written_by_conversion(name: str) -> bool:
    """Whether a top-level entry of an output directory is one that a conversion writes (the ``.tmp`` names of its
    files too: an interrupted conversion leaves them, and a re-run resumes or replaces them)."""
    if name == WORK_DIRNAME or _SHARD_FILE.match(name):
        return True
    return name.removesuffix(".tmp") in _OUTPUT_FILES


def _remove_outputs(out: str) -> None:
    """Delete everything a conversion wrote to ``out`` (for ``overwrite``)."""
    for _, path in _shard_files(out):
        os.remove(path)
    for name in _OUTPUT_FILES + tuple(name + ".tmp" for name in _OUTPUT_FILES):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, WORK_DIRNAME), ignore_errors=True)


def _remove_stale_shards(out: str, num_shards: int) -> None:
    """Delete files of shards numbered ``>= num_shards`` (left over after the input got shorter)."""
    for shard_id, path in _shard_files(out):
        if shard_id >= num_shards:
            os.remove(path)


def _load_mark(out: str, plan: ShardPlan, config_key: str) -> dict[str, Any] | None:
    """A finished shard's mark, if it matches this run (options and the bytes of its line range)."""
    try:
        with open(_work_path(out, plan.shard_id, ".json")) as f:
            mark = json.load(f)
    except (OSError, ValueError):
        return None
    # Identity of a shard: its lines and their bytes. Byte offsets may move (an earlier line was edited) without
    # changing what the shard holds.
    old_plan = mark.get("plan") or {}
    if mark.get("config_key") != config_key or any(
        old_plan.get(k) != getattr(plan, k) for k in ("shard_id", "first_line", "num_lines", "digest")
    ):
        return None
    if not os.path.exists(_work_path(out, plan.shard_id, ".rejects.jsonl")):
        return None
    info = mark["shard"]
    if info["samples"]:
        path = os.path.join(out, info["basename"])
        if not os.path.exists(path) or os.path.getsize(path) != info["bytes"]:
            return None
    return mark


def convert(
    input_path: str,
    kind: str,
    out: str,
    *,
    selected_cols: str | Sequence[int | None] | None = None,
    num_cols: int | None = None,
    rows_per_shard: int = 2048,
    row_group_rows: int = 128,
    row_group_bytes: int | None = DEFAULT_ROW_GROUP_BYTES,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    compression_level: int | None = None,
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    clip_boxes: bool = False,
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO,
    preparation: ImagePreparation | None = None,
) -> ConversionSummary:
    """Convert ``input_path`` (a TSV of ``kind``) into Parquet shards, ``index.json`` and reject/summary files.

    Args:
        selected_cols: which TSV column feeds each field of the kind's layout (``"0,5,2,3,4,1"``; ``-`` for an
            absent optional field); default: the identity.
        num_cols: how many tab-separated columns every line must have; default: highest selected column + 1.
        rows_per_shard: input lines per shard (rejected lines included, so shard boundaries are deterministic).
        row_group_rows: rows per Parquet row group (the unit of random access when streaming).
        row_group_bytes: a row group also ends once its rows hold this many bytes of text and image data (None:
            by rows only), so that a random read of a radiograph-sized row decodes megabytes, not hundreds.
        workers: worker processes (1 = convert in this process).
        strict: stop at the first bad row with :class:`StrictModeError`.
        overwrite: replace an existing conversion in ``out`` made with other options or another input.
        max_field_chars: longest text field kept, in characters (longer: rejected as ``field_too_long``).
        max_image_bytes: largest image kept, in decoded bytes (larger: rejected as ``field_too_long``).
        clip_boxes: clip detection/grounding boxes that reach past the image instead of rejecting the row
            (``box_outside_image``); a box wholly outside is rejected either way.
        max_reject_ratio: fail when more than this share of the rows is rejected (1 = never for the share); a
            conversion that keeps no row always fails.
        preparation: shrink, window and re-encode images once, here (:mod:`biomedgpt.data.image_preparation`);
            recorded in ``index.json``'s config and the summary. Default: images are stored as they come.

    Raises:
        ConversionError: bad arguments or an unusable output directory (nothing converted).
        StrictModeError: ``strict`` and a bad row.
        TooManyRejectsError: no row kept, or more than ``max_reject_ratio`` rejected; ``rejects.jsonl`` and the
            summary (``failed``) are written, ``index.json`` is not. ``error.summary`` is the summary.
    """
    started = time.monotonic()
    if not os.path.exists(input_path):
        raise ConversionError(f"input file {input_path} does not exist")
    if not os.path.isfile(input_path):
        raise ConversionError(f"input {input_path} is not a regular file")
    try:
        spec = get_kind(kind)
        cols = parse_selected_cols(spec, selected_cols)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    max_col = max(c for c in cols if c is not None)
    if num_cols is None:
        num_cols = max_col + 1
    elif num_cols <= max_col:
        raise ConversionError(f"--num-cols {num_cols} is too small for --selected-cols (highest column {max_col})")
    if row_group_rows < 1 or rows_per_shard < 1:
        raise ConversionError("--rows-per-shard and --row-group-rows must be >= 1")
    if row_group_bytes is not None and row_group_bytes < 1:
        raise ConversionError("--row-group-bytes must be >= 1")
    if workers < 1:
        raise ConversionError("--workers must be >= 1")
    options = RowOptions(max_field_chars, max_image_bytes, bool(clip_boxes))
    try:
        options.check()
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if not (isinstance(max_reject_ratio, (int, float)) and 0.0 <= max_reject_ratio <= 1.0):
        raise ConversionError(
            f"max_reject_ratio (--max-reject-ratio) must be between 0 and 1 (1 turns the check off), "
            f"got {max_reject_ratio!r}"
        )

    preparation = preparation or ImagePreparation()
    if spec.name == "image" and (preparation.max_side or preparation.max_shorter_side):
        raise ConversionError(
            "kind 'image': each row's 256 VQ-GAN codes describe its stored 256 x 256 pixels, so its images cannot be "
            "resized (--max-image-side/--max-shorter-side); --image-encoding alone is allowed"
        )
    config = _config(
        input_path, spec, cols, num_cols, rows_per_shard, row_group_rows, options, preparation, row_group_bytes
    )
    config_key = _config_key(config)
    try:
        # overwrite=True: an earlier conversion here is resumed or, below, replaced by the --overwrite rule; what
        # this refuses is an --out that holds the input or anything a conversion does not write.
        check_output_dir(
            out, tool="biomedgpt-convert", inputs=[input_path], overwrite=True, owned=written_by_conversion
        )
    except OutputDirError as exc:
        raise ConversionError(f"--out: {exc}") from None
    os.makedirs(os.path.join(out, WORK_DIRNAME), exist_ok=True)
    previous = _existing_config(out)
    if previous is not None and previous != config:
        if not overwrite:
            older = sorted(set(config) - set(previous))
            why = (
                f" (it was made by an earlier version of biomedgpt-convert, without the options {', '.join(older)})"
                if older
                else ""
            )
            raise ConversionError(
                f"{out} already holds a conversion of {_describe(previous)}; this run asks for {_describe(config)}"
                f"{why}. Choose another --out directory, or pass --overwrite to replace what is there."
            )
        _remove_outputs(out)
        os.makedirs(os.path.join(out, WORK_DIRNAME), exist_ok=True)
    with open(os.path.join(out, WORK_DIRNAME, MANIFEST_BASENAME), "w") as f:
        json.dump(config, f, indent=1)

    plans = plan_shards(input_path, rows_per_shard, progress=progress)
    marks: dict[int, dict[str, Any]] = {}
    pending: list[_Task] = []
    for plan in plans:
        mark = _load_mark(out, plan, config_key)
        # Strict mode redoes shards that hold rejects from an earlier lenient run, so it stops at the first one.
        if mark is not None and not (strict and mark["rejects"]):
            marks[plan.shard_id] = mark
        else:
            pending.append(
                _Task(
                    plan,
                    os.path.abspath(input_path),
                    str(input_path),
                    spec.name,
                    tuple(cols),
                    num_cols,
                    row_group_rows,
                    os.path.abspath(out),
                    config_key,
                    strict,
                    compression_level,
                    options,
                    preparation,
                    row_group_bytes,
                )
            )
    reused = len(marks)
    # Stale shards beyond the end (the input got shorter) and an index from before must not survive.
    _remove_stale_shards(out, len(plans))
    if os.path.exists(os.path.join(out, INDEX_BASENAME)):
        os.remove(os.path.join(out, INDEX_BASENAME))

    total_lines = sum(p.num_lines for p in plans)
    bar = _progress_bar(progress, total=total_lines, unit="line", desc=f"convert {spec.name}")
    if bar is not None:
        bar.update(sum(marks[s]["rows_read"] for s in marks))
    results = _run(pending, workers, strict)
    try:
        for mark in results:
            if "strict_error" in mark:
                raise StrictModeError(mark["strict_error"])
            marks[mark["plan"]["shard_id"]] = mark
            if bar is not None:
                bar.update(mark["rows_read"])
    finally:
        results.close()  # on an error, leave the pool's `with` now: terminates the other workers
        if bar is not None:
            bar.close()

    summary = _finish(out, input_path, spec, config, plans, marks, reused, float(max_reject_ratio))
    summary.elapsed_s = round(time.monotonic() - started, 3)
    with open(os.path.join(out, SUMMARY_BASENAME), "w") as f:
        json.dump(summary.to_json(), f, indent=1)
    if summary.failed:
        raise TooManyRejectsError(summary.failure, summary)
    return summary


def _run(tasks: list[_Task], workers: int, strict: bool) -> Iterator[dict[str, Any]]:
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield _convert_shard(task)
        return
    # fork where there is one: workers start at once and the caller's script needs no `if __name__ == "__main__"`
    # guard (spawn re-imports it). The workers only use pyarrow, whose thread pools are fork-safe.
    # concurrent.futures rather than multiprocessing.Pool: stopping early (a strict-mode error) cancels the shards not
    # started and lets the running ones finish. Pool.terminate() kills workers that may hold the task queue's lock,
    # and its clean-up then waits for that lock for ever (seen as a hung test run).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
        futures = [pool.submit(_convert_shard, task) for task in tasks]
        try:
            # Strict mode needs results in file order so that the first error reported is the first in the file.
            for future in futures if strict else as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _finish(
    out: str,
    input_path: str,
    spec: KindSpec,
    config: dict[str, Any],
    plans: list[ShardPlan],
    marks: dict[int, dict[str, Any]],
    reused: int,
    max_reject_ratio: float,
) -> ConversionSummary:
    """Merge per-shard marks and rejects into rejects.jsonl and the summary, and index.json unless it failed."""
    summary = ConversionSummary(
        input=str(input_path),
        kind=spec.name,
        out=str(out),
        shards_planned=len(plans),
        shards_reused=reused,
        shards_converted=len(plans) - reused,
        selected_cols=list(config["selected_cols"]),
        num_cols=config["num_cols"],
        rows_per_shard=config["rows_per_shard"],
        row_group_rows=config["row_group_rows"],
        row_group_bytes=config["row_group_bytes"],
        max_field_chars=config["max_field_chars"],
        max_image_bytes=config["max_image_bytes"],
        clip_boxes=config["clip_boxes"],
        max_reject_ratio=max_reject_ratio,
        image_preparation=config.get("image_preparation", {}),
    )
    reasons: Counter[str] = Counter()
    decodings: Counter[str] = Counter()
    prepared: Counter[str] = Counter()
    infos: list[ShardInfo] = []
    tmp_rejects = os.path.join(out, REJECTS_BASENAME + ".tmp")
    with open(tmp_rejects, "wb") as merged:
        for plan in plans:
            mark = marks[plan.shard_id]
            summary.rows_read += mark["rows_read"]
            summary.rows_written += mark["rows_written"]
            summary.rows_clipped += mark.get("rows_clipped", 0)
            summary.crlf_lines += mark.get("crlf_lines", 0)
            summary.utf8_bom = summary.utf8_bom or bool(mark.get("utf8_bom"))
            decodings.update(mark.get("image_decodings", {}))
            prepared.update(mark.get("images_prepared", {}))
            reasons.update(mark["rejects"])
            if mark["shard"]["samples"]:
                infos.append(ShardInfo.from_json(mark["shard"]))
            with open(_work_path(out, plan.shard_id, ".rejects.jsonl"), "rb") as part:
                shutil.copyfileobj(part, merged)
    os.replace(tmp_rejects, os.path.join(out, REJECTS_BASENAME))
    summary.rows_rejected = sum(reasons.values())
    summary.rejects_by_reason = dict(sorted(reasons.items()))
    summary.image_decodings = dict(decodings.most_common())
    summary.images_prepared = dict(sorted(prepared.items()))
    preparing = _prepares_images(spec, "image_preparation" in config)
    summary.shards_with_rows = len(infos)
    if summary.rows_read != summary.rows_written + summary.rows_rejected:  # pragma: no cover - an internal bug
        raise ConversionError(
            f"internal error: {summary.rows_read} rows read but {summary.rows_written} written "
            f"+ {summary.rows_rejected} rejected"
        )
    summary.failure = _failure(summary, max_reject_ratio)
    if summary.failure:
        summary.failed = True
        return summary
    meta = {
        "config": config,
        "rows_read": summary.rows_read,
        "rows_written": summary.rows_written,
        "rows_rejected": summary.rows_rejected,
        "rows_clipped": summary.rows_clipped,
        "columns": {f.name: str(f.type) for f in (prepared_schema(spec.schema) if preparing else spec.schema)},
    }
    if preparing:
        meta["images_prepared"] = summary.images_prepared
    write_index(out, infos, meta)
    return summary


def _failure(summary: ConversionSummary, max_reject_ratio: float) -> str:
    """Why this conversion must not be trained on (no row kept, too many rejected), or ``""``."""
    read, rejected = summary.rows_read, summary.rows_rejected
    what = f"{summary.input} as kind {summary.kind!r}"
    if read == 0:
        return f"{what}: no rows kept: the input has no lines. Nothing was written for training (no index.json)."
    if summary.rows_written == 0:
        problem = f"no rows kept: all {read} rows rejected"
    elif rejected / read > max_reject_ratio:
        problem = (
            f"{rejected} of {read} rows rejected ({100 * rejected / read:.0f}%), "
            f"over --max-reject-ratio {max_reject_ratio:g}"
        )
    else:
        return ""
    top = sorted(summary.rejects_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    examples = _first_rejects(os.path.join(summary.out, REJECTS_BASENAME), {reason for reason, _ in top})
    lines = [f"{what}: {problem}. Most frequent reasons:"]
    width = max(len(reason) for reason, _ in top)
    for reason, count in top:
        example = examples.get(reason)
        lines.append(
            f"  {reason:<{width}}  {count}"
            + (f"  e.g. {_where(example)}: {example['detail']}" if example is not None else "")
        )
    hint = (
        "; check --kind, --selected-cols and --num-cols against the file's columns"
        if top[0][0] == "wrong_column_count"
        else ""
    )
    remedy = "fix the input and re-run" + (
        "" if summary.rows_written == 0 else ", or raise --max-reject-ratio (1 = any share) to keep the valid rows"
    )
    lines.append(
        f"Every rejected line is in {os.path.join(summary.out, REJECTS_BASENAME)}{hint}. "
        f"No index.json was written; {remedy}."
    )
    return "\n".join(lines)


def _first_rejects(path: str, reasons: set[str]) -> dict[str, dict[str, Any]]:
    """The first reject record of each of ``reasons`` in the merged rejects file (read only as far as needed)."""
    found: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["reason"] in reasons and record["reason"] not in found:
                found[record["reason"]] = record
                if len(found) == len(reasons):
                    break
    return found
