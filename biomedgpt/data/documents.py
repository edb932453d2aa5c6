"""Raw documents -> token shards for causal-LM training (BioMedGPT-LM-style continued pretraining).

Inputs: JSONL files (one JSON object per line, the text in ``text_field``), plain text files (one document per
file) and Parquet files (the text in column ``text_field``), given as files or as a folder whose files of those
kinds are read in sorted order. Each document is tokenized with the model's own tokenizer (a Hugging Face tokenizer
directory, as ``transformers.AutoTokenizer`` loads it; its own special tokens included, e.g. Llama's BOS), and an EOS
is appended when the tokenizer did not end it with one.

Rows (``mode``):

- ``pack``: the documents' tokens, one after the other, cut into rows of exactly ``seq_len`` tokens; a document
  continues in the next row. Only the very last row may be shorter (the trainer pads it and masks the padding),
  so no token is dropped or repeated: the rows, read in order, are the documents' tokens. With
  ``keep_document_ids`` each row also holds, per token, the number of its document, so attention can be kept
  from crossing documents.
- ``truncate``: one row per document, cut to ``seq_len`` tokens; what is cut is counted (``tokens_truncated``).

Columns: ``input_ids`` (list<int32>), ``document_ids`` (list<int32>, with ``keep_document_ids``) and
``source_line`` (the number of the first document of the row, from 1: the converter's row locator).

Bad input is never dropped silently: empty documents, undecodable UTF-8, unparsable JSON lines, a missing or
non-text field, unreadable files are counted by reason and written to ``rejects.jsonl`` with the file and line
(``conversion_summary.json`` sums up). A conversion that keeps no document, or rejects more than
``max_reject_ratio`` of them, fails without ``index.json`` (its rejects and summary stay for inspection).

The output directory appears whole (written under a temporary name, then renamed) with a manifest, so an output
holding files this tool did not write is refused, and ``overwrite`` replaces only an earlier output of it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from biomedgpt.data.parquet_shards import ShardSink, read_index, rejection_failure, write_index
from biomedgpt.output_dirs import check_output_dir, replace_output_dir, staging_dir

__all__ = [
    "DOCUMENT_SUFFIXES",
    "TOOL",
    "DocumentConversionError",
    "DocumentSummary",
    "convert_documents",
    "document_files",
    "token_shards_meta",
]

TOOL = "biomedgpt-convert --kind documents"
DOCUMENT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
REJECTS_BASENAME = "rejects.jsonl"
SUMMARY_BASENAME = "conversion_summary.json"
DEFAULT_SEQ_LEN = 2048
DEFAULT_ROWS_PER_SHARD = 4096
DEFAULT_MAX_REJECT_RATIO = 0.5


class DocumentConversionError(ValueError):
    """A conversion that cannot be used (bad arguments, unreadable tokenizer, no or too few documents kept)."""

    def __init__(self, message: str, summary: DocumentSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class DocumentSummary:
    """What a conversion read and wrote; ``document_tokens == tokens_written + tokens_truncated``."""

    inputs: list[str]
    mode: str
    seq_len: int
    tokenizer: str
    documents_read: int = 0
    documents_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0  # empty lines between JSON lines: not documents
    document_tokens: int = 0  # every kept document's tokens, EOS included
    tokens_written: int = 0
    tokens_truncated: int = 0
    rows: int = 0
    last_row_tokens: int = 0
    shards: int = 0
    failed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Document:
    source: str
    line: int  # the line of a JSONL file, the row of a Parquet file, 1 for a text file
    text: str | None = None
    reason: str | None = None  # why it is rejected
    detail: str = ""


def document_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files to read: each input file, and each folder's files of the supported kinds in sorted order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
            if not found:
                raise DocumentConversionError(f"{item}: no {'/'.join(DOCUMENT_SUFFIXES)} files in this folder")
            files.extend(found)
        elif item.is_file():
            if item.suffix.lower() not in DOCUMENT_SUFFIXES:
                raise DocumentConversionError(
                    f"{item}: unsupported file kind {item.suffix!r}; documents come as {', '.join(DOCUMENT_SUFFIXES)}"
                )
            files.append(item)
        else:
            raise DocumentConversionError(f"{item}: no such file or folder")
    return files


def _json_documents(path: Path, text_field: str, summary: DocumentSummary) -> Iterator[_Document]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                summary.blank_lines += 1
                continue
            where = _Document(str(path), number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield _reject(where, "non_utf8", f"byte {error.start}: {error.reason}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield _reject(where, "unreadable_json", str(error))
                continue
            if not isinstance(record, dict) or text_field not in record:
                yield _reject(where, "missing_text_field", f"no {text_field!r} field")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                yield _reject(where, "text_not_string", f"{text_field!r} is {type(text).__name__}")
                continue
            yield _text(where, text)


def _text_document(path: Path) -> Iterator[_Document]:
    where = _Document(str(path), 1)
    try:
        data = path.read_bytes()
    except OSError as error:
        yield _reject(where, "unreadable_file", str(error))
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        yield _reject(where, "non_utf8", f"byte {error.start}: {error.reason}")
        return
    yield _text(where, text)


def _parquet_documents(path: Path, text_field: str) -> Iterator[_Document]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        yield _reject(_Document(str(path), 0), "unreadable_file", str(error))
        return
    if text_field not in parquet.schema_arrow.names:
        raise DocumentConversionError(
            f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            "name the text column with --text-field"
        )
    number = 0
    for group in range(parquet.num_row_groups):
        for value in parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            number += 1
            where = _Document(str(path), number)
            if value is None or isinstance(value, str):
                yield _text(where, value or "")
            else:
                yield _reject(where, "text_not_string", f"{text_field!r} is {type(value).__name__}")


def _reject(where: _Document, reason: str, detail: str) -> _Document:
    where.reason, where.detail = reason, detail
    return where


def _text(where: _Document, text: str) -> _Document:
    if not text.strip():
        return _reject(where, "empty", "no text")
    where.text = text
    return where


def _documents(files: Sequence[Path], text_field: str, summary: DocumentSummary) -> Iterator[_Document]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            yield from _json_documents(path, text_field, summary)
        elif suffix == ".txt":
            yield from _text_document(path)
        else:
            yield from _parquet_documents(path, text_field)


def _load_tokenizer(tokenizer: str | os.PathLike[str] | Any) -> tuple[Any, int, str]:
    if not isinstance(tokenizer, (str, os.PathLike)):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    else:
        from transformers import AutoTokenizer

        name = str(tokenizer)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise DocumentConversionError(f"cannot load the tokenizer {name}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise DocumentConversionError(f"the tokenizer {name} has no EOS token; documents need one between them")
    return tokenizer, int(tokenizer.eos_token_id), str(name)


def convert_documents(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Any,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    mode: Literal["pack", "truncate"] = "pack",
    keep_document_ids: bool = False,
    text_field: str = "text",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    row_group_rows: int = 128,
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO,
    overwrite: bool = False,
    progress: bool = False,
) -> DocumentSummary:
    """Tokenize ``inputs`` into token shards in ``out`` (see the module docstring); returns the summary.

    Raises :class:`DocumentConversionError` for bad arguments, and after writing the rejects and a failed summary
    (no ``index.json``) when no document is kept or more than ``max_reject_ratio`` are rejected.
    """
    if seq_len < 2:
        raise DocumentConversionError(f"seq_len={seq_len}: a row needs at least 2 tokens")
    if mode not in ("pack", "truncate"):
        raise DocumentConversionError(f"mode={mode!r}: choose pack or truncate")
    if keep_document_ids and mode != "pack":
        raise DocumentConversionError("document ids are kept for packed rows (mode=pack); truncated rows hold one")
    if rows_per_shard < 1 or row_group_rows < 1:
        raise DocumentConversionError("rows_per_shard and row_group_rows must be >= 1")
    files = document_files(inputs)
    check_output_dir(out, tool=TOOL, inputs=inputs, overwrite=overwrite)  # before any work
    tok, eos, tokenizer_name = _load_tokenizer(tokenizer)

    summary = DocumentSummary([str(p) for p in files], mode, seq_len, tokenizer_name)
    fields = [pa.field("input_ids", pa.list_(pa.int32()))]
    if keep_document_ids:
        fields.append(pa.field("document_ids", pa.list_(pa.int32())))
    fields.append(pa.field("source_line", pa.int64()))
    staging = staging_dir(out)
    sink = ShardSink(staging, pa.schema(fields), rows_per_shard, row_group_rows)
    rejected: Counter[str] = Counter()
    pending: list[int] = []  # pack: tokens not yet in a row
    pending_docs: list[int] = []
    first_doc = 1  # the document number of pending[0]

    def emit(tokens: list[int], docs: list[int] | None, first: int) -> None:
        row: dict[str, Any] = {"input_ids": tokens, "source_line": first}
        if docs is not None:
            row["document_ids"] = docs
        sink.write(row)
        summary.rows += 1
        summary.tokens_written += len(tokens)
        summary.last_row_tokens = len(tokens)

    try:
        with (staging / REJECTS_BASENAME).open("w", encoding="utf-8") as rejects:
            documents = _documents(files, text_field, summary)
            if progress:
                from tqdm import tqdm

                documents = tqdm(documents, desc="documents", unit="doc")
            for document in documents:
                summary.documents_read += 1
                if document.text is None:
                    rejected[str(document.reason)] += 1
                    record = {"file": document.source, "line": document.line, "reason": document.reason}
                    rejects.write(json.dumps({**record, "detail": document.detail}) + "\n")
                    continue
                tokens = list(tok(document.text, add_special_tokens=True)["input_ids"])
                if not tokens or tokens[-1] != eos:
                    tokens.append(eos)
                summary.documents_kept += 1
                number = summary.documents_kept
                summary.document_tokens += len(tokens)
                if mode == "truncate":
                    summary.tokens_truncated += max(len(tokens) - seq_len, 0)
                    emit(tokens[:seq_len], None, number)
                    continue
                if not pending:
                    first_doc = number
                pending.extend(tokens)
                if keep_document_ids:
                    pending_docs.extend([number] * len(tokens))
                cut = 0
                while len(pending) - cut >= seq_len:
                    docs = pending_docs[cut : cut + seq_len] if keep_document_ids else None
                    emit(pending[cut : cut + seq_len], docs, first_doc)
                    cut += seq_len
                    first_doc = number  # what is left (under a row) is all this document's: the rest was cut
                if cut:
                    pending, pending_docs = pending[cut:], pending_docs[cut:]
            if pending:  # the last, shorter row: no token is left out
                emit(pending, pending_docs if keep_document_ids else None, first_doc)
        sink.close()
        summary.rejected = dict(rejected.most_common())
        summary.shards = len(sink.shards)
        problem = rejection_failure(
            summary.documents_kept, summary.documents_read, summary.rejected, "document", max_reject_ratio
        )
        summary.failed = problem is not None
        (staging / SUMMARY_BASENAME).write_text(json.dumps(summary.to_json(), indent=1) + "\n", encoding="utf-8")
        if problem is None:
            meta = {
                "kind": "documents",
                "mode": mode,
                "seq_len": seq_len,
                "document_ids": keep_document_ids,
                "tokenizer": tokenizer_name,
                "vocab_size": len(tok),
                "eos_token_id": eos,
                "tokens": summary.tokens_written,
            }
            write_index(str(staging), sink.shards, meta)
        replace_output_dir(staging, out, tool=TOOL, overwrite=overwrite)
    except BaseException:
        sink.discard()
        raise
    if problem is not None:
        raise DocumentConversionError(f"{problem}; see {Path(out) / REJECTS_BASENAME}", summary)
    return summary


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
