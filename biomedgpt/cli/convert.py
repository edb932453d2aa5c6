"""``biomedgpt-convert``: turn a BiomedGPT/OFA TSV file into Parquet shards readable by mosaicml-streaming.

Examples::

    biomedgpt-convert vision_language.tsv --kind vision_language --out data/vl/ --workers 4
    biomedgpt-convert vqa_rad/train.tsv --kind vqa --out data/vqa_rad_train/
    biomedgpt-convert roco_train.tsv --kind caption --selected-cols 0,-,2,-,1 --num-cols 3 --out data/roco/
    biomedgpt-convert mednli_train.tsv --kind nli --out data/mednli/ --strict
    biomedgpt-convert pmc_papers/ --kind documents --tokenizer models/llama-2-7b --seq-len 2048 --out data/pmc/

Field layouts are those of the files the BiomedGPT/OFA producer scripts write, so such files need no
``--selected-cols``. For other files, ``--selected-cols`` gives, for each field in this order, the 0-based TSV
column that feeds it (``-`` marks an optional field the file does not have)::

{layouts}

Bad rows are written to OUT/rejects.jsonl (file, line, reason, column, detail) and counted by reason in
OUT/conversion_summary.json; ``--strict`` stops at the first one instead (exit status 1). A conversion that keeps
no row, or rejects more than ``--max-reject-ratio`` of them, fails (exit status 1) without writing OUT/index.json;
its rejects and summary stay for inspection. Re-running the same command skips finished shards.
Exit status: 0 success (rejects within the limit), 1 strict-mode failure, no row kept or too many rejected,
2 usage error.

Kind ``documents`` (causal-LM training) reads raw documents instead of a TSV: JSONL (``--text-field``, default
``text``), plain text files (one document each) or Parquet, as files or a folder of them. Each is tokenized with
``--tokenizer`` (a Hugging Face tokenizer directory) and the token rows are packed to exactly ``--seq-len`` tokens
with an EOS between documents (``--keep-document-ids`` adds each token's document number), or, with ``--truncate``,
one row per document cut to ``--seq-len``. Empty, non-UTF-8 and unreadable documents are counted and written to
OUT/rejects.jsonl as for TSVs (biomedgpt/data/documents.py).

Kind ``conversations`` (vision-language chat training) reads LLaVA conversation JSON (an array or JSON lines of
``{{id, image, conversations: [{{from: human|gpt, value}}]}}``), images by path (``--image-folder``) or embedded as
base64, PNG/JPEG/DICOM, and writes the image bytes into the shards. Records with a missing or unreadable image, a
missing or extra ``<image>`` tag, or empty or out-of-order turns are counted and written to OUT/rejects.jsonl
(biomedgpt/data/conversations.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from biomedgpt.data.convert import (
    DEFAULT_MAX_REJECT_RATIO,
    SUMMARY_BASENAME,
    ConversionError,
    ConversionSummary,
    StrictModeError,
    TooManyRejectsError,
    convert,
)
from biomedgpt.data.documents import DEFAULT_ROWS_PER_SHARD, DEFAULT_SEQ_LEN, DocumentConversionError, convert_documents
from biomedgpt.data.image_preparation import ENCODINGS, PRETRAIN_MAX_SHORTER_SIDE, ImagePreparation
from biomedgpt.data.parquet_shards import DEFAULT_ROW_GROUP_BYTES
from biomedgpt.data.schema import DEFAULT_MAX_FIELD_CHARS, DEFAULT_MAX_IMAGE_BYTES, KINDS
from biomedgpt.output_dirs import OutputDirError

DOCUMENTS_KIND = "documents"
CONVERSATIONS_KIND = "conversations"


def _layouts() -> str:
    lines = []
    for spec in KINDS.values():
        fields = ", ".join(f.name + ("" if f.required else "?") for f in spec.fields)
        lines.append(f"    {spec.name:<16} {fields}")
    return "\n".join(lines) + "\n    (? = optional)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biomedgpt-convert",
        description=(__doc__ or "").format(layouts=_layouts()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="TSV file to convert (kind documents: files or a folder)")
    parser.add_argument(
        "--kind",
        required=True,
        choices=[*KINDS, DOCUMENTS_KIND, CONVERSATIONS_KIND],
        metavar="KIND",
        help=f"column layout: {', '.join(KINDS)}; or {DOCUMENTS_KIND} (raw documents to token rows), or "
        f"{CONVERSATIONS_KIND} (LLaVA conversation JSON with images)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (shards, index.json, ...)")
    parser.add_argument(
        "--selected-cols", metavar="I,J,...", help="TSV column for each layout field, as OFA's --selected-cols"
    )
    parser.add_argument(
        "--num-cols", type=int, metavar="N", help="columns every line must have (default: highest selected + 1)"
    )
    parser.add_argument("--rows-per-shard", type=int, default=2048, metavar="N", help="input lines per shard")
    parser.add_argument(
        "--row-group-rows", type=int, default=128, metavar="N", help="rows per Parquet row group (random access unit)"
    )
    parser.add_argument(
        "--row-group-bytes",
        type=int,
        default=DEFAULT_ROW_GROUP_BYTES,
        metavar="N",
        help=f"also end a row group at N bytes of row data (default {DEFAULT_ROW_GROUP_BYTES}: a random read of one "
        "radiograph-sized row then decodes megabytes, not the hundreds of 128 such rows)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    parser.add_argument("--compression-level", type=int, metavar="L", help="zstd level (default: pyarrow's)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row with a precise error")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a conversion in --out made from another input or options"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-field-chars",
        type=int,
        default=DEFAULT_MAX_FIELD_CHARS,
        metavar="N",
        help=f"reject rows with a text field longer than N characters (default {DEFAULT_MAX_FIELD_CHARS})",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        metavar="N",
        help=f"reject rows whose image file (the bytes the base64 text encodes, before any pixel decoding) is "
        f"larger than N bytes (default {DEFAULT_MAX_IMAGE_BYTES})",
    )
    parser.add_argument(
        "--clip-boxes",
        action="store_true",
        help="clip detection/grounding boxes reaching past the image instead of rejecting the row",
    )
    parser.add_argument(
        "--max-reject-ratio",
        type=float,
        default=DEFAULT_MAX_REJECT_RATIO,
        metavar="R",
        help=f"fail (exit 1) when more than this share of rows is rejected (default {DEFAULT_MAX_REJECT_RATIO:g}; "
        "1 = no limit, but keeping no row always fails)",
    )
    documents = parser.add_argument_group("kind documents (raw documents -> token rows for causal-LM training)")
    documents.add_argument("--tokenizer", metavar="DIR", help="the model's Hugging Face tokenizer directory (required)")
    documents.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="N", help=f"tokens per row (default {DEFAULT_SEQ_LEN})"
    )
    documents.add_argument("--truncate", action="store_true", help="one row per document, cut to --seq-len")
    documents.add_argument(
        "--keep-document-ids", action="store_true", help="packed rows also hold each token's document number"
    )
    documents.add_argument("--text-field", default="text", metavar="NAME", help="JSONL field / Parquet column")
    documents.add_argument(
        "--rows-per-shard-documents",
        type=int,
        default=DEFAULT_ROWS_PER_SHARD,
        metavar="N",
        help=f"token rows per shard (default {DEFAULT_ROWS_PER_SHARD})",
    )
    conversations = parser.add_argument_group("kind conversations (LLaVA conversation JSON -> shards with images)")
    conversations.add_argument(
        "--image-folder", metavar="DIR", help="folder that the records' relative image paths start from"
    )
    prepare = parser.add_argument_group(
        "image preparation (off unless one of these is given; docs/benchmarks.md: data pipeline)",
        "Decode each image once here (16-bit grey and DICOM windowed into 8 bits by the training decoder's rule), "
        "shrink it keeping its aspect ratio, store grey images as one channel, and re-encode it; boxes are scaled "
        "exactly and the original size is kept in the row. An 8-bit JPEG/PNG that needs no shrinking keeps its bytes.",
    )
    prepare.add_argument(
        "--max-image-side", type=int, metavar="N", help="longer side at most N px (e.g. 672, the pretraining cap)"
    )
    prepare.add_argument(
        "--max-shorter-side",
        type=int,
        metavar="N",
        help=f"shorter side at most N px ({PRETRAIN_MAX_SHORTER_SIDE}: the largest the pretraining image-text "
        "transforms draw; fine-tuning: its patch image size)",
    )
    prepare.add_argument(
        "--image-encoding",
        choices=ENCODINGS,
        help="stored encoding of prepared images: source (JPEG for JPEG sources, PNG for the rest; the default), "
        "jpeg, png, webp (lossless)",
    )
    prepare.add_argument(
        "--jpeg-quality", type=int, default=95, metavar="Q", help="JPEG quality of re-encoded JPEGs (default 95)"
    )
    return parser


def _print_summary(summary: ConversionSummary) -> None:
    print(
        f"{summary.input} -> {summary.out} ({summary.kind}): {summary.rows_read} rows read, "
        f"{summary.rows_written} written, {summary.rows_rejected} rejected; "
        f"{summary.shards_with_rows} shards ({summary.shards_reused} reused from an earlier run) "
        f"in {summary.elapsed_s:.1f} s"
    )
    if summary.rejects_by_reason:
        width = max(len(r) for r in summary.rejects_by_reason)
        for reason, count in sorted(summary.rejects_by_reason.items(), key=lambda kv: -kv[1]):
            print(f"  {reason:<{width}}  {count}")
        print(f"  details: {summary.out}/rejects.jsonl")
    if summary.rows_clipped:
        print(f"  {summary.rows_clipped} row{'s' if summary.rows_clipped != 1 else ''} with boxes clipped to the image")
    if summary.crlf_lines:
        print(f"  {summary.crlf_lines} lines ended in CRLF (accepted as line endings)")
    if summary.utf8_bom:
        print("  a UTF-8 byte order mark at the start of the file was dropped")
    shown = list(summary.image_decodings.items())
    if shown:
        print("  images decoded by rule (see docs/medical_images.md):")
        for rule, count in shown[:8]:
            print(f"    {count:>8}  {rule}")
        if len(shown) > 8:
            print(f"    {sum(c for _, c in shown[8:]):>8}  by {len(shown) - 8} other rules ({SUMMARY_BASENAME})")
    if summary.image_preparation:
        counts = summary.images_prepared
        mib_in, mib_out = counts.get("bytes in", 0) / 2**20, counts.get("bytes out", 0) / 2**20
        print(
            f"  images prepared ({summary.image_preparation}): {counts.get('resized', 0)} resized, "
            f"{counts.get('re-encoded', 0)} re-encoded, {counts.get('kept as stored', 0)} kept as stored, "
            f"{counts.get('grey, one channel', 0)} grey as one channel; {mib_in:.1f} MiB -> {mib_out:.1f} MiB"
        )
    if summary.failed:
        print(f"  FAILED: no {summary.out}/index.json written (see the error below)")


def _convert_documents(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.tokenizer:
        parser.exit(
            2, "biomedgpt-convert: error: --kind documents needs --tokenizer (the model's tokenizer directory)\n"
        )
    try:
        summary = convert_documents(
            [args.input],
            args.out,
            args.tokenizer,
            seq_len=args.seq_len,
            mode="truncate" if args.truncate else "pack",
            keep_document_ids=args.keep_document_ids,
            text_field=args.text_field,
            rows_per_shard=args.rows_per_shard_documents,
            row_group_rows=args.row_group_rows,
            max_reject_ratio=args.max_reject_ratio,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except DocumentConversionError as exc:
        if exc.summary is None:
            parser.exit(2, f"biomedgpt-convert: error: {exc}\n")
        print(f"biomedgpt-convert: error: {exc}", file=sys.stderr)
        return 1
    except OutputDirError as exc:
        parser.exit(2, f"biomedgpt-convert: error: {exc}\n")
    rejected = sum(summary.rejected.values())
    print(
        f"{args.input} -> {args.out} (documents, {summary.mode}, {summary.seq_len} tokens): "
        f"{summary.documents_read} documents read, {summary.documents_kept} kept, {rejected} rejected; "
        f"{summary.tokens_written} tokens in {summary.rows} rows, {summary.shards} shards"
        + (f"; {summary.tokens_truncated} tokens cut by --truncate" if summary.tokens_truncated else "")
    )
    for reason, count in summary.rejected.items():
        print(f"  {reason:<20}  {count}")
    if rejected:
        print(f"  details: {args.out}/rejects.jsonl")
    return 0


def _convert_conversations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from biomedgpt.data.conversations import ConversationConversionError, convert_conversations

    try:
        summary = convert_conversations(
            [args.input],
            args.out,
            image_folder=args.image_folder,
            row_group_rows=args.row_group_rows,
            max_reject_ratio=args.max_reject_ratio,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversationConversionError as exc:
        if exc.summary is None:
            parser.exit(2, f"biomedgpt-convert: error: {exc}\n")
        print(f"biomedgpt-convert: error: {exc}", file=sys.stderr)
        return 1
    except OutputDirError as exc:
        parser.exit(2, f"biomedgpt-convert: error: {exc}\n")
    rejected = sum(summary.rejected.values())
    print(
        f"{args.input} -> {args.out} (conversations): {summary.records_read} records read, {summary.records_kept} "
        f"kept ({summary.with_image} with an image, {summary.turns} turns), {rejected} rejected; "
        f"{summary.shards} shards"
    )
    for reason, count in summary.rejected.items():
        print(f"  {reason:<24}  {count}")
    if rejected:
        print(f"  details: {args.out}/rejects.jsonl")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == DOCUMENTS_KIND:
        return _convert_documents(parser, args)
    if args.kind == CONVERSATIONS_KIND:
        return _convert_conversations(parser, args)
    try:
        preparation = ImagePreparation(
            args.max_image_side, args.max_shorter_side, args.image_encoding, args.jpeg_quality
        )
    except ValueError as exc:
        parser.exit(2, f"biomedgpt-convert: error: {exc}\n")
    try:
        summary = convert(
            args.input,
            args.kind,
            args.out,
            selected_cols=args.selected_cols,
            num_cols=args.num_cols,
            rows_per_shard=args.rows_per_shard,
            row_group_rows=args.row_group_rows,
            row_group_bytes=args.row_group_bytes,
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            compression_level=args.compression_level,
            max_field_chars=args.max_field_chars,
            max_image_bytes=args.max_image_bytes,
            clip_boxes=args.clip_boxes,
            max_reject_ratio=args.max_reject_ratio,
            preparation=preparation,
        )
    except TooManyRejectsError as exc:
        _print_summary(exc.summary)
        print(f"biomedgpt-convert: error: {exc}", file=sys.stderr)
        return 1
    except StrictModeError as exc:
        print(f"biomedgpt-convert: error: {exc}", file=sys.stderr)
        return 1
    except ConversionError as exc:
        parser.exit(2, f"biomedgpt-convert: error: {exc}\n")
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
