"""LLaVA conversation JSON -> Parquet shards with the image bytes inside (``biomedgpt-convert --kind conversations``),
for vision-language chat training (LLaVA / LLaVA-Med / Vision-BioLLM data).

Input: LLaVA's layout, a JSON array (``llava_v1_5_mix665k.json``, ``llava_med_instruct_60k.json``) or JSON lines, of
records ``{"id": ..., "image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": ...}, ...]}``. ``image`` is a path (relative to ``image_folder``, or absolute) of a PNG, JPEG or DICOM
file, or the image itself as a ``data:image/...;base64,`` URI or plain base64; a record without ``image`` is a
text-only conversation (LLaVA mixes in ShareGPT).

Kept records become rows ``id``, ``image`` (the file's bytes as stored, decoded at training time by
:func:`biomedgpt.data.images.decode_image`; null for text-only), ``image_source`` (the path, or ``embedded``),
``turns`` (list of ``{role: user|assistant, text}``) and ``source_line`` (the record's line of a JSON-lines file, or
its position in the array, from 1). Rejected records, counted by reason and written to ``rejects.jsonl`` with their
line: ``unreadable_json``, ``not_an_object``, ``no_conversations``, ``bad_turn`` (not ``{from, value}`` with a text
value), ``unknown_speaker`` (``from`` not human/gpt), ``empty_turn``, ``out_of_order`` (turns must alternate
human, gpt, ..., from a human turn to a gpt turn), ``missing_image_tag`` (an image and no ``<image>`` in a human
turn), ``extra_image_tag`` (more than one ``<image>``, or one in a gpt turn), ``image_tag_without_image``,
``missing_image`` (no such file), ``unreadable_image`` (not decodable: damaged, or not an image), ``bad_base64``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from biomedgpt.data.chat_templates import IMAGE_PLACEHOLDER
from biomedgpt.data.images import decode_image
from biomedgpt.data.parquet_shards import ShardSink, rejection_failure, write_index
from biomedgpt.output_dirs import check_output_dir, replace_output_dir, staging_dir

__all__ = ["ConversationConversionError", "ConversationSummary", "convert_conversations"]

TOOL = "biomedgpt-convert --kind conversations"
REJECTS_BASENAME = "rejects.jsonl"
SUMMARY_BASENAME = "conversion_summary.json"
DEFAULT_ROWS_PER_SHARD = 1024
DEFAULT_MAX_REJECT_RATIO = 0.5
ROLES = {"human": "user", "gpt": "assistant"}
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_source", pa.string()),
        pa.field("turns", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("text", pa.string())]))),
        pa.field("source_line", pa.int64()),
    ]
)


class ConversationConversionError(ValueError):
    """A conversion that cannot be used (bad arguments, unreadable input, no or too few records kept)."""

    def __init__(self, message: str, summary: ConversationSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class ConversationSummary:
    inputs: list[str]
    image_folder: str | None
    records_read: int = 0
    records_kept: int = 0
    with_image: int = 0
    turns: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    failed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _RejectedRecord(Exception):  # noqa: N818 (a record's verdict, raised inside this module)
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or position, record) of a JSON array or JSON-lines file; an unreadable line is a _RejectedRecord record."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no content
    except (OSError, UnicodeDecodeError) as error:
        raise ConversationConversionError(f"{path}: cannot read it as UTF-8 text ({error})") from error
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConversationConversionError(
                f"{path}: not a readable JSON array (line {error.lineno}, column {error.colno}: {error.msg})"
            ) from error
        yield from enumerate(records, start=1)
        return
    # split("\n"), not splitlines(): JSON strings may hold U+2028, U+2029 and U+0085 unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, _RejectedRecord("unreadable_json", f"column {error.colno}: {error.msg}")


def _turns(record: dict[str, Any]) -> list[dict[str, str]]:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _RejectedRecord("no_conversations", "no 'conversations' list of turns")
    turns = []
    for index, turn in enumerate(conversations, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise _RejectedRecord("bad_turn", f"turn {index} is not {{'from': ..., 'value': text}}")
        if turn["from"] not in ROLES:
            raise _RejectedRecord("unknown_speaker", f"turn {index} is from {turn['from']!r}, not human or gpt")
        if not turn["value"].strip():
            raise _RejectedRecord("empty_turn", f"turn {index} ({turn['from']}) has no text")
        expected = "human" if index % 2 else "gpt"
        if turn["from"] != expected:
            detail = f"turn {index} is from {turn['from']}; turns alternate human, gpt, ..."
            raise _RejectedRecord("out_of_order", detail)
        turns.append({"role": ROLES[turn["from"]], "text": turn["value"]})
    if turns[-1]["role"] != "assistant":
        raise _RejectedRecord("out_of_order", f"the last turn ({len(turns)}) is from human: it has no answer")
    return turns


def _image_tags(turns: list[dict[str, str]], has_image: bool) -> None:
    in_user = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in turns if t["role"] == "user")
    in_assistant = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in turns if t["role"] == "assistant")
    if in_assistant or in_user > 1:
        raise _RejectedRecord(
            "extra_image_tag", f"{in_user + in_assistant} {IMAGE_PLACEHOLDER} tags ({in_assistant} in gpt turns)"
        )
    if has_image and not in_user:
        raise _RejectedRecord("missing_image_tag", f"an image but no {IMAGE_PLACEHOLDER} in a human turn")
    if in_user and not has_image:
        raise _RejectedRecord("image_tag_without_image", f"{IMAGE_PLACEHOLDER} in a human turn but no 'image'")


def _image_bytes(value: Any, image_folder: Path | None) -> tuple[bytes, str]:
    if not isinstance(value, str) or not value.strip():
        raise _RejectedRecord("missing_image", f"'image' is {type(value).__name__}, not a path or base64 text")
    embedded = _DATA_URI.match(value)
    path = Path(value) if not embedded and len(value) < 4096 else None
    if path is not None and not path.is_absolute() and image_folder is not None:
        path = image_folder / path
    if path is not None and path.is_file():
        try:
            return path.read_bytes(), str(path)
        except OSError as error:
            raise _RejectedRecord("missing_image", f"{path}: {error}") from None
    if embedded or len(value) > 256:  # a data URI, or a long text that is no file: base64 of the image
        try:
            return base64.b64decode(value[embedded.end() :] if embedded else value, validate=True), "embedded"
        except (binascii.Error, ValueError) as error:
            raise _RejectedRecord("bad_base64", f"embedded image: {error}") from None
    raise _RejectedRecord("missing_image", f"{path}: no such file" + ("" if image_folder else " (give --image-folder)"))


def _row(record: Any, line: int, image_folder: Path | None) -> dict[str, Any]:
    if isinstance(record, _RejectedRecord):
        raise record
    if not isinstance(record, dict):
        raise _RejectedRecord("not_an_object", f"a JSON {type(record).__name__}, not an object")
    turns = _turns(record)
    has_image = record.get("image") not in (None, "")
    _image_tags(turns, has_image)
    image, source = None, None
    if has_image:
        image, source = _image_bytes(record["image"], image_folder)
        try:
            decode_image(image, source)  # PNG, JPEG, DICOM, ...: what training will decode
        except ValueError as error:
            raise _RejectedRecord("unreadable_image", str(error)) from None
    return {"id": str(record.get("id", line)), "image": image, "image_source": source, "turns": turns,
            "source_line": line}  # fmt: skip


def convert_conversations(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    image_folder: str | os.PathLike[str] | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    row_group_rows: int = 64,
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversationSummary:
    """Convert LLaVA conversation files into shards in ``out`` (see the module docstring); returns the summary.

    Raises :class:`ConversationConversionError` for bad arguments or unreadable inputs, and after writing the
    rejects and a failed summary (no ``index.json``) when no record is kept or more than ``max_reject_ratio`` are
    rejected.
    """
    files = [Path(p) for p in inputs]
    for path in files:
        if not path.is_file():
            raise ConversationConversionError(f"{path}: no such file (LLaVA conversation JSON or JSON lines)")
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise ConversationConversionError(f"--image-folder {folder}: no such folder")
    if rows_per_shard < 1 or row_group_rows < 1:
        raise ConversationConversionError("rows_per_shard and row_group_rows must be >= 1")
    check_output_dir(out, tool=TOOL, inputs=[*inputs, *([folder] if folder else [])], overwrite=overwrite)
    summary = ConversationSummary([str(p) for p in files], str(folder) if folder else None)
    staging = staging_dir(out)
    sink = ShardSink(staging, SCHEMA, rows_per_shard, row_group_rows)
    rejected: Counter[str] = Counter()
    try:
        with (staging / REJECTS_BASENAME).open("w", encoding="utf-8") as rejects:
            for path in files:
                records = _records(path)
                if progress:
                    from tqdm import tqdm

                    records = tqdm(records, desc=path.name, unit="record")
                for line, record in records:
                    summary.records_read += 1
                    try:
                        row = _row(record, line, folder)
                    except _RejectedRecord as reject:
                        rejected[reject.reason] += 1
                        entry = {"file": str(path), "line": line, "reason": reject.reason, "detail": reject.detail}
                        if isinstance(record, dict) and "id" in record:
                            entry["id"] = str(record["id"])
                        rejects.write(json.dumps(entry) + "\n")
                        continue
                    sink.write(row)
                    summary.records_kept += 1
                    summary.with_image += row["image"] is not None
                    summary.turns += len(row["turns"])
        sink.close()
        summary.rejected = dict(rejected.most_common())
        summary.shards = len(sink.shards)
        problem = rejection_failure(
            summary.records_kept, summary.records_read, summary.rejected, "conversation", max_reject_ratio
        )
        summary.failed = problem is not None
        (staging / SUMMARY_BASENAME).write_text(json.dumps(summary.to_json(), indent=1) + "\n", encoding="utf-8")
        if problem is None:
            meta = {"kind": "conversations", "records": summary.records_kept, "with_image": summary.with_image}
            write_index(str(staging), sink.shards, meta)
        replace_output_dir(staging, out, tool=TOOL, overwrite=overwrite)
    except BaseException:
        sink.discard()
        raise
    if problem is not None:
        raise ConversationConversionError(f"{problem}; see {Path(out) / REJECTS_BASENAME}", summary)
    return summary
