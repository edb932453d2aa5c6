"""Column layouts of the BiomedGPT/OFA TSV files, their typed Parquet schemas, and per-row validation.

Every *kind* of TSV (pretraining: read by BiomedGPT data/pretrain_data/unify_dataset.py, written by
scripts/preprocess/pretraining/; fine-tuning: written by scripts/preprocess/finetuning/) has a layout: the fields of
the file its producer scripts write, in that order. ``--selected-cols i,j,...`` says which TSV column feeds each
layout field (the same pick-and-reorder semantics as OFA's ``FileDataset``); ``-`` leaves an optional field empty
for files that lack it.

Parquet columns keep the original field names. Fields that hold numbers become typed columns (``code`` ->
``list<int16>``, nli ``label`` -> ``int8``, ``label_index`` -> ``int32``); images become the raw encoded file bytes
(``binary``, the base64 text is decoded once here). Compound text fields that the original datasets parse at load
time (``refs``, the detection ``label``) are kept verbatim *and* parsed into extra typed columns (``answers`` +
``answer_confs``, ``box``, ``boxes``), so downstream code can use either. Every table also has ``source_line``
(1-based line of the row in its TSV) for traceability back to the input.

:func:`parse_row` turns one raw TSV line into a column dict or raises :class:`RowError` with one of
:data:`REJECT_REASONS`.
"""

from __future__ import annotations

import base64
import binascii
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

__all__ = [
    "DEFAULT_MAX_FIELD_CHARS",
    "DEFAULT_MAX_IMAGE_BYTES",
    "KINDS",
    "REJECT_REASONS",
    "SCHEMA_VERSION",
    "FieldSpec",
    "ImageInfo",
    "KindSpec",
    "RowError",
    "RowOptions",
    "decode_base64",
    "get_kind",
    "parse_answers",
    "parse_box",
    "parse_codes",
    "parse_detection_label",
    "parse_row",
    "parse_selected_cols",
    "fit_box",
    "verify_image",
]

# Bumped whenever the Parquet layout of any kind changes, so re-runs do not mix old and new shards.
SCHEMA_VERSION = 1

NUM_IMAGE_CODES = 256  # 16x16 VQ-GAN grid (BiomedGPT scripts/preprocess/pretraining/generate_code.py)
CODEBOOK_SIZE = 8192
VL_TYPES = ("caption", "qa", "visual_grounding")

# Every way a row can be rejected. The converter counts rows by these names; keep them stable.
REJECT_REASONS: tuple[str, ...] = (
    "blank_line",  # an empty line (OFA would crash on it)
    # A \r inside a field, or more than one before the \n (a single \r\n is a line ending and is accepted).
    "carriage_return",
    "bad_encoding",  # not valid UTF-8
    "nul_byte",  # a NUL character in a field: never real text, and the tokenizer would keep it
    "wrong_column_count",  # also how a stray tab inside a field shows up
    # Over RowOptions.max_field_chars (text) or max_image_bytes (decoded image): every epoch would pay for it.
    "field_too_long",
    "empty_required_field",
    "bad_base64",
    "undecodable_image",  # the decoder training uses (biomedgpt.data.images.decode_image) cannot read it
    "malformed_answer",  # refs not `conf|!+answer[&&...]` or conf not a finite float >= 0
    "malformed_box",  # not 4 numbers, negative, or x0>=x1 / y0>=y1
    "malformed_codes",  # not 256 ints in [0, 8191]
    "malformed_detection_label",  # a detection entry without `x0,y0,x1,y1,cat_id,cat_name`
    "bad_label",  # nli label not 0/1/2, classification label_index not a non-negative int
    "bad_type",  # vision_language `type` not one of caption / qa / visual_grounding
    # A detection or grounding box reaching past the image (or, with clip_boxes, wholly outside it): training's crops
    # clip boxes to the image and drop those left empty, which would leave a row with an empty or wrong target.
    "box_outside_image",
)

DEFAULT_MAX_FIELD_CHARS = 1 << 20  # 1 Mi characters: far above any real caption/report, yet cheap to tokenize
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # 64 MiB of encoded image (a large uncompressed DICOM slice is ~0.5-32 MiB)


@dataclass(frozen=True)
class RowOptions:
    """Per-row limits and box handling of :func:`parse_row` (``biomedgpt-convert --max-field-chars`` etc.)."""

    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS  # characters of any non-image field
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # bytes of a decoded (base64) image field
    clip_boxes: bool = False  # clip boxes reaching past the image instead of rejecting the row

    def check(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        for name in ("max_field_chars", "max_image_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


_DEFAULT_OPTIONS = RowOptions()


class ImageInfo(NamedTuple):
    """What :func:`verify_image` learnt from decoding an image: its format and size in pixels."""

    format: str
    width: int
    height: int
    decoding: str = ""  # the decoder's rule, e.g. "PNG I;16 grey scaled by 4095" (biomedgpt.data.images)


# parse_row's note for a row's image: this prefix and the decoding rule (the converter counts them per rule).
IMAGE_NOTE = "image: "


class RowError(ValueError):
    """A row that cannot be converted.

    ``field_index`` is the position in the kind's layout (``None`` when the problem is not tied to one field, e.g.
    a wrong column count); ``tsv_column`` is the 0-based column of the TSV line where the problem was found.
    """

    def __init__(self, reason: str, detail: str, field_index: int | None = None, tsv_column: int | None = None) -> None:
        if reason not in REJECT_REASONS:
            raise AssertionError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.field_index = field_index
        self.tsv_column = tsv_column


@dataclass(frozen=True)
class FieldSpec:
    """One field of a kind's layout: its name, how its text is parsed, and whether it may be empty."""

    name: str
    parser: str  # text | image | objects_text | codes | nli_label | int | refs_* | det_label
    required: bool = True


@dataclass(frozen=True)
class KindSpec:
    """A TSV kind: its layout, default ``--selected-cols``, and typed Parquet schema."""

    name: str
    fields: tuple[FieldSpec, ...]
    schema: pa.Schema
    description: str
    # Required-field rules that depend on another field's value (vision_language rows by `type`).
    conditional_required: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def default_selected_cols(self) -> tuple[int, ...]:
        return tuple(range(len(self.fields)))


def _text(name: str, required: bool = True) -> FieldSpec:
    return FieldSpec(name, "text", required)


_ANSWER_COLS = [pa.field("answers", pa.list_(pa.string())), pa.field("answer_confs", pa.list_(pa.float32()))]
_BOX_TYPE = pa.list_(pa.float32())  # 4 values; a fixed-size list with nulls does not survive a Parquet round trip
_DET_BOX_TYPE = pa.struct(
    [
        pa.field("x0", pa.float32()),
        pa.field("y0", pa.float32()),
        pa.field("x1", pa.float32()),
        pa.field("y1", pa.float32()),
        pa.field("category_id", pa.int32()),
        pa.field("category_name", pa.string()),
    ]
)
_SOURCE_LINE = pa.field("source_line", pa.int64(), nullable=False)


def _schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema([*fields, _SOURCE_LINE])


def _s(name: str) -> pa.Field:
    return pa.field(name, pa.string())


def _img(name: str = "image") -> pa.Field:
    return pa.field(name, pa.binary())


KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        KindSpec(
            "vision_language",
            (
                _text("uniq_id"),
                FieldSpec("image", "image"),
                _text("caption", False),
                _text("question", False),
                FieldSpec("refs", "refs_vl", False),
                _text("gt_objects", False),
                _text("dataset_name", False),
                FieldSpec("type", "vl_type"),
            ),
            _schema(
                _s("uniq_id"),
                _img(),
                _s("caption"),
                _s("question"),
                _s("refs"),
                _s("gt_objects"),
                _s("dataset_name"),
                _s("type"),
                *_ANSWER_COLS,
                pa.field("box", _BOX_TYPE),
            ),
            "pretraining image-text pairs (process_image_text_pair): caption / qa / visual_grounding rows",
            {"type": {"caption": ("caption",), "qa": ("question", "refs"), "visual_grounding": ("caption", "refs")}},
        ),
        KindSpec(
            "text",
            (_text("uniq_id"), _text("text")),
            _schema(_s("uniq_id"), _s("text")),
            "pretraining plain text (unify_dataset.py process_pure_text)",
        ),
        KindSpec(
            "image",
            (_text("uniq_id"), FieldSpec("image", "image"), FieldSpec("code", "codes")),
            _schema(_s("uniq_id"), _img(), pa.field("code", pa.list_(pa.int16()))),
            "pretraining images with 256 VQ-GAN codes (unify_dataset.py process_pure_image)",
        ),
        KindSpec(
            "detection",
            (_text("uniq_id"), FieldSpec("image", "image"), FieldSpec("label", "det_label")),
            _schema(_s("uniq_id"), _img(), _s("label"), pa.field("boxes", pa.list_(_DET_BOX_TYPE))),
            "pretraining detection: `&&`-joined `x0,y0,x1,y1,cat_id,cat_name` boxes (process_detection)",
        ),
        KindSpec(
            "vqa",
            (
                _text("question_id"),
                _text("image_id", False),
                _text("question"),
                FieldSpec("refs", "refs_answers"),
                _text("objects", False),
                FieldSpec("image", "image"),
            ),
            _schema(
                _s("question_id"), _s("image_id"), _s("question"), _s("refs"), *_ANSWER_COLS, _s("objects"), _img()
            ),
            "fine-tuning VQA (VQA-RAD / SLAKE / PathVQA files of scripts/preprocess/finetuning/vqa_rad.py etc.)",
        ),
        KindSpec(
            "caption",
            (
                _text("uniq_id"),
                _text("image_id", False),
                _text("caption"),
                _text("objects", False),
                FieldSpec("image", "image"),
            ),
            _schema(_s("uniq_id"), _s("image_id"), _s("caption"), _s("objects"), _img()),
            "fine-tuning captioning (IU X-ray / Peir Gross / ROCO files of preprocess/finetuning/iu_xray.py etc.)",
        ),
        KindSpec(
            "summarization",
            (_text("source"), _text("target")),
            _schema(_s("source"), _s("target")),
            "fine-tuning summarization (MeQSum / HealthcareMagic / iCliniq, data/nlg_data/summary_dataset.py)",
        ),
        KindSpec(
            "nli",
            (_text("sentence1"), _text("sentence2"), FieldSpec("label", "nli_label"), _text("genre", False)),
            _schema(_s("sentence1"), _s("sentence2"), pa.field("label", pa.int8()), _s("genre")),
            "fine-tuning NLI (MedNLI: label 0=neutral, 1=entailment, 2=contradiction; preprocess/finetuning/mednli.py)",
        ),
        KindSpec(
            "classification",
            (FieldSpec("image", "image"), FieldSpec("label_index", "int"), _text("label_name")),
            _schema(_img(), pa.field("label_index", pa.int32()), _s("label_name")),
            "fine-tuning image classification (MedMNIST files of scripts/preprocess/finetuning/medmnist.py)",
        ),
    )
}


def get_kind(name: str) -> KindSpec:
    """Look up a kind by name; the error lists the valid choices."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown kind {name!r}; choose one of: {', '.join(KINDS)}") from None


def parse_selected_cols(kind: KindSpec, text: str | Sequence[int | None] | None) -> tuple[int | None, ...]:
    """Parse ``--selected-cols`` (``"0,5,2,3,4,1"``; ``-`` = field absent from the TSV) for ``kind``.

    Entry ``i`` names the 0-based TSV column that feeds layout field ``i``. ``None``/empty gives the identity.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return kind.default_selected_cols
    raw: list[str | int | None] = text.split(",") if isinstance(text, str) else list(text)
    layout = ", ".join(f"{i}:{f.name}" for i, f in enumerate(kind.fields))
    need = f"kind {kind.name!r} needs {len(kind.fields)} comma-separated columns, one per field ({layout})"
    if len(raw) != len(kind.fields):
        raise ValueError(f"--selected-cols {text!r} has {len(raw)} entries; {need}")
    cols: list[int | None] = []
    for spec, item in zip(kind.fields, raw):
        if item is None or (isinstance(item, str) and item.strip() in ("-", "")):
            if spec.required:
                raise ValueError(f"--selected-cols: field {spec.name!r} is required and cannot be '-'; {need}")
            cols.append(None)
            continue
        try:
            col = int(item)
        except ValueError:
            raise ValueError(f"--selected-cols: {item!r} is not a column number; {need}") from None
        if col < 0:
            raise ValueError(f"--selected-cols: column {col} is negative; {need}")
        cols.append(col)
    return tuple(cols)


# ------------------------------------------------------------------------------------------------ field parsers


def decode_base64(text: str) -> bytes:
    """Decode base64 in either alphabet (OFA decodes with ``urlsafe_b64decode``, producers write standard).

    Unlike ``urlsafe_b64decode`` this rejects characters outside the alphabet instead of silently dropping them,
    so a truncated or mangled image string is reported rather than half-decoded.
    """
    try:
        return base64.b64decode(text.translate(_URLSAFE_TO_STD), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RowError("bad_base64", f"invalid base64 ({exc}; {len(text)} characters)") from None


_URLSAFE_TO_STD = str.maketrans("-_", "+/")


def verify_image(data: bytes, source: str = "<bytes>", images_out: list[Any] | None = None) -> ImageInfo:
    """Fully decode ``data`` with the decoder training uses and return its format and size.

    Going through :func:`biomedgpt.data.images.decode_image` (PIL formats and DICOM) makes conversion accept exactly
    what training can read; decoding every pixel also catches truncated JPEG scans that PIL's ``verify`` misses.
    A decompression-bomb warning counts as an error, so one row cannot make every epoch allocate gigabytes.
    With ``images_out`` the decoded image (grey ones as one channel) is appended to it, for preparation.
    """
    # Imported here: the images module pulls in torch, which kinds without images never need.
    from PIL import Image

    from biomedgpt.data.images import decode_image, decoding_kind, is_dicom

    if not data:
        raise RowError("undecodable_image", "image decodes to 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = decode_image(data, source, keep_grey=images_out is not None)
    except Exception as exc:  # ValueError from the decoder; also whatever a damaged file makes PIL/pydicom raise
        raise RowError("undecodable_image", f"cannot decode the image: {type(exc).__name__}: {exc}") from None
    fmt = "DICOM" if is_dicom(data) else image.format or _image_format(data)
    width, height = image.size
    if images_out is not None:
        images_out.append(image)
    return ImageInfo(fmt, width, height, decoding_kind(image))


def _image_format(data: bytes) -> str:
    """The format name from the header only (decode_image's RGB copy of a non-RGB image has lost it)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format or "unknown"
    except Exception:  # it decoded a moment ago; any failure here only costs the name
        return "unknown"


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def parse_answers(text: str) -> tuple[list[str], list[float]]:
    """Parse ``conf|!+answer&&conf|!+answer...`` into answers and confidences (order kept)."""
    answers: list[str] = []
    confs: list[float] = []
    for item in text.split("&&"):
        conf_text, sep, answer = item.partition("|!+")
        if not sep:
            raise RowError("malformed_answer", f"answer {item!r} lacks the `conf|!+answer` separator")
        if not answer.strip():
            raise RowError("malformed_answer", f"answer {item!r} has empty answer text")
        try:
            conf = _finite_float(conf_text)
        except ValueError:
            raise RowError("malformed_answer", f"confidence {conf_text!r} in {item!r} is not a number") from None
        if conf < 0:
            raise RowError("malformed_answer", f"confidence {conf_text!r} in {item!r} is negative")
        answers.append(answer)
        confs.append(conf)
    return answers, confs


def parse_box(parts: Sequence[str], what: str = "box") -> list[float]:
    """Four pixel coordinates ``x0,y0,x1,y1`` with ``0 <= x0 < x1`` and ``0 <= y0 < y1``."""
    if len(parts) != 4:
        raise RowError("malformed_box", f"{what} needs 4 numbers x0,y0,x1,y1, got {len(parts)}")
    try:
        x0, y0, x1, y1 = (_finite_float(p) for p in parts)
    except ValueError:
        raise RowError("malformed_box", f"{what} {','.join(parts)!r} holds a non-number") from None
    if min(x0, y0, x1, y1) < 0:
        raise RowError("malformed_box", f"{what} {','.join(parts)!r} has a negative coordinate")
    if x0 >= x1 or y0 >= y1:
        raise RowError("malformed_box", f"{what} {','.join(parts)!r} is empty or inverted (need x0<x1, y0<y1)")
    return [x0, y0, x1, y1]


def parse_detection_label(text: str) -> list[dict[str, Any]]:
    """``x0,y0,x1,y1,cat_id,cat_name&&...``; the name may contain commas (OFA splits with ``split(',', 5)``)."""
    boxes = []
    for k, item in enumerate(text.split("&&")):
        parts = item.split(",", 5)
        if len(parts) != 6:
            raise RowError(
                "malformed_detection_label", f"entry {k} {item!r} is not x0,y0,x1,y1,category_id,category_name"
            )
        x0, y0, x1, y1 = parse_box(parts[:4], what=f"entry {k} box")
        try:
            cat_id = int(parts[4])
        except ValueError:
            raise RowError("malformed_detection_label", f"entry {k} category id {parts[4]!r} is not an int") from None
        if not parts[5].strip():
            raise RowError("malformed_detection_label", f"entry {k} {item!r} has an empty category name")
        boxes.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "category_id": cat_id, "category_name": parts[5]})
    return boxes


def _fmt_box(box: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in box)


def fit_box(box: Sequence[float], width: int, height: int, clip: bool = False, what: str = "box") -> list[float] | None:
    """Check a parsed ``x0,y0,x1,y1`` box against a ``width`` x ``height`` image.

    Coordinates are pixel edges, so ``x1 == width`` touches the border and is inside. Returns ``None`` when the box
    lies inside; with ``clip`` a box reaching past the right/bottom edge comes back cut to the image. Raises
    ``box_outside_image`` otherwise, and (with ``clip``) when nothing of the box is left: training's crops
    (biomedgpt/data/transforms.py ``_crop_target``) clip to the image the same way and drop such empty boxes.
    """
    x0, y0, x1, y1 = box
    if x1 <= width and y1 <= height:
        return None
    where = f"{what} {_fmt_box(box)} reaches past the {width}x{height} image (width x height)"
    if not clip:
        raise RowError("box_outside_image", f"{where}; fix the box, or clip such boxes (--clip-boxes)")
    clipped = [x0, y0, min(x1, float(width)), min(y1, float(height))]
    if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
        raise RowError("box_outside_image", f"{where}: it lies wholly outside, nothing is left after clipping")
    return clipped


def parse_codes(text: str) -> list[int]:
    """256 space-separated VQ-GAN ids in ``[0, 8191]``."""
    parts = text.split()
    if len(parts) != NUM_IMAGE_CODES:
        raise RowError("malformed_codes", f"expected {NUM_IMAGE_CODES} codes, got {len(parts)}")
    codes = []
    for part in parts:
        try:
            code = int(part)
        except ValueError:
            raise RowError("malformed_codes", f"code {part!r} is not an integer") from None
        if not 0 <= code < CODEBOOK_SIZE:
            raise RowError("malformed_codes", f"code {code} outside [0, {CODEBOOK_SIZE - 1}]")
        codes.append(code)
    return codes


# ------------------------------------------------------------------------------------------------ rows


def parse_row(
    kind: KindSpec,
    line: bytes,
    selected_cols: Sequence[int | None],
    num_cols: int,
    source_line: int,
    *,
    options: RowOptions | None = None,
    notes: list[str] | None = None,
    images_out: list[tuple[Any, ImageInfo]] | None = None,
) -> dict[str, Any]:
    """Validate one TSV line (without its line ending, ``\\n`` or ``\\r\\n``) and return its Parquet column values.

    Raises :class:`RowError` on the first problem found, checking whole-line problems (blank, ``\\r``, column
    count) before fields (encoding, NUL, length) in layout order, and boxes against the image size last.
    ``options`` sets the field-length limits and box clipping; when a box is clipped, ``"box_clipped"`` is appended
    to ``notes`` (if given) so the caller can count such rows. With ``images_out``, the row's decoded image (grey
    ones as one channel) and its :class:`ImageInfo` are appended to it (conversion prepares images from them).
    """
    opts = options or _DEFAULT_OPTIONS
    if not line.strip():
        raise RowError("blank_line", "the line is empty")
    columns = line.split(b"\t")
    if b"\r" in line:
        col = next(i for i, c in enumerate(columns) if b"\r" in c)
        where = (
            "at the end of the line (only one \\r before the \\n is a line ending)"
            if line.endswith(b"\r")
            else "inside a field (a file with \\r-only line endings shows up this way)"
        )
        raise RowError("carriage_return", f"carriage return {where}", _field_of(col, selected_cols), col)
    if len(columns) != num_cols:
        raise RowError(
            "wrong_column_count",
            f"expected {num_cols} tab-separated columns, found {len(columns)}"
            + (" (a stray tab inside a field shows up this way)" if len(columns) > num_cols else ""),
        )
    texts: list[str] = []
    for fi, col in enumerate(selected_cols):
        if col is None:
            texts.append("")
            continue
        raw = columns[col]
        is_image = kind.fields[fi].parser == "image"
        # Base64 of n bytes is at least 4*(n-2)/3 characters: a longer field cannot decode within the limit.
        if is_image and (len(raw.strip()) // 4) * 3 - 2 > opts.max_image_bytes:
            raise RowError("field_too_long", _too_long_image(len(raw.strip()) // 4 * 3, opts, approx=True), fi, col)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError("bad_encoding", f"not valid UTF-8 ({exc.reason} at byte {exc.start})", fi, col) from None
        if "\x00" in text:
            raise RowError("nul_byte", f"NUL character at position {text.index(chr(0))} of the field", fi, col)
        if not is_image and len(text) > opts.max_field_chars:
            raise RowError(
                "field_too_long",
                f"{len(text)} characters, over the limit of {opts.max_field_chars} (--max-field-chars)",
                fi,
                col,
            )
        texts.append(text)

    out: dict[str, Any] = {}
    images: list[ImageInfo] = []  # the row's image, for the box checks and the decoding rule
    decoded: list[Any] | None = [] if images_out is not None else None
    values = dict(zip(kind.field_names, texts))
    for fi, (spec, text) in enumerate(zip(kind.fields, texts)):
        col = selected_cols[fi]
        required = spec.required or any(
            spec.name in names.get(values.get(key, ""), ()) for key, names in kind.conditional_required.items()
        )
        if required and not text.strip():
            raise RowError("empty_required_field", f"field {spec.name!r} is empty", fi, col)
        try:
            _parse_field(kind, spec, text, values, out, opts, f"line {source_line}", images, decoded)
        except RowError as err:
            err.field_index, err.tsv_column = fi, col
            raise
    if images:
        _check_boxes(kind, out, selected_cols, (images[0].width, images[0].height), opts, notes)
        if notes is not None:
            notes.append(IMAGE_NOTE + images[0].decoding)
        if images_out is not None and decoded:
            images_out.append((decoded[0], images[0]))
    out["source_line"] = source_line
    return out


def _field_of(tsv_column: int, selected_cols: Sequence[int | None]) -> int | None:
    """The layout field a TSV column feeds (``None`` for a column the kind does not use)."""
    return selected_cols.index(tsv_column) if tsv_column in selected_cols else None


def _too_long_image(size: int, opts: RowOptions, approx: bool = False) -> str:
    return (
        f"image of {'about ' if approx else ''}{size} bytes, over the limit of {opts.max_image_bytes} "
        "(--max-image-bytes)"
    )


def _check_boxes(
    kind: KindSpec,
    out: dict[str, Any],
    selected_cols: Sequence[int | None],
    size: tuple[int, int],
    opts: RowOptions,
    notes: list[str] | None,
) -> None:
    """Boxes against the image they belong to (detection ``boxes``, a visual_grounding row's ``box``)."""
    width, height = size
    clipped = False
    try:
        if out.get("boxes"):
            field_name = "label"
            for k, box in enumerate(out["boxes"]):
                coords = (box["x0"], box["y0"], box["x1"], box["y1"])
                fitted = fit_box(coords, width, height, opts.clip_boxes, what=f"entry {k} box")
                if fitted is not None:
                    box["x1"], box["y1"] = fitted[2], fitted[3]
                    clipped = True
        elif out.get("box") is not None:
            field_name = "refs"
            fitted = fit_box(out["box"], width, height, opts.clip_boxes, what="region box")
            if fitted is not None:
                out["box"], clipped = fitted, True
        else:
            return
    except RowError as err:
        err.field_index = kind.field_names.index(field_name)
        err.tsv_column = selected_cols[err.field_index]
        raise
    if clipped and notes is not None:
        notes.append("box_clipped")


def _parse_field(
    kind: KindSpec,
    spec: FieldSpec,
    text: str,
    values: dict[str, str],
    out: dict[str, Any],
    opts: RowOptions,
    source: str,
    images: list[ImageInfo],
    decoded: list[Any] | None = None,
) -> None:
    p = spec.parser
    if p == "text":
        out[spec.name] = text
    elif p == "image":
        data = decode_base64(text.strip())
        if len(data) > opts.max_image_bytes:
            raise RowError("field_too_long", _too_long_image(len(data), opts))
        info = verify_image(data, source, decoded)
        images.append(info)  # for the box checks once every field is parsed
        out[spec.name] = data
    elif p == "codes":
        out[spec.name] = parse_codes(text)
    elif p == "nli_label":
        if text.strip() not in ("0", "1", "2"):
            raise RowError("bad_label", f"nli label {text!r} is not 0 (neutral), 1 (entailment) or 2 (contradiction)")
        out[spec.name] = int(text)
    elif p == "int":
        try:
            value = int(text)
        except ValueError:
            raise RowError("bad_label", f"{spec.name} {text!r} is not an integer") from None
        if value < 0 or value >= 2**31:
            raise RowError("bad_label", f"{spec.name} {value} is out of range")
        out[spec.name] = value
    elif p == "vl_type":
        if text not in VL_TYPES:
            raise RowError("bad_type", f"type {text!r} is not one of {', '.join(VL_TYPES)}")
        out[spec.name] = text
    elif p == "refs_answers":
        out[spec.name] = text
        out["answers"], out["answer_confs"] = parse_answers(text)
    elif p == "refs_vl":
        # What refs means depends on the row type (unify_dataset.py process_image_text_pair): answers for qa, a box
        # for visual_grounding.
        out[spec.name] = text
        out["answers"], out["answer_confs"], out["box"] = [], [], None
        row_type = values.get("type", "")
        if row_type == "qa":
            out["answers"], out["answer_confs"] = parse_answers(text)
        elif row_type == "visual_grounding":
            out["box"] = parse_box(text.split(","))
    elif p == "det_label":
        out[spec.name] = text
        out["boxes"] = parse_detection_label(text)
    else:  # pragma: no cover - a layout typo, not a data problem
        raise AssertionError(f"{kind.name}.{spec.name}: unknown parser {p!r}")
