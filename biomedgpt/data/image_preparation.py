"""Images prepared once, at conversion, so that training decodes small 8-bit images (``biomedgpt-convert
--max-image-side/--max-shorter-side/--image-encoding``).

A chest radiograph of 2,500 px costs ~40x the decoding of the 480 px image the pretraining transforms draw at most
(OFA's RandomResize: shorter side 256..480, each side capped at 672), and a 16-bit CT slice needs its window applied
on every step. Preparing an image:

- decodes it with the rule training uses (:func:`biomedgpt.data.images.decode_image`, so 16-bit PNG/TIFF and DICOM
  are windowed into 8 bits exactly as the loader would do each step);
- shrinks it, keeping its aspect ratio, until the longer side is at most ``max_side`` and the shorter side at most
  ``max_shorter_side`` (bicubic, the transforms' filter; images already inside both limits keep their size);
- stores grey images as one channel (also grey ones that arrive as RGB with three equal channels);
- encodes it as ``encoding``: ``source`` (JPEG for JPEG sources, PNG for everything else), ``jpeg``, ``png`` or
  ``webp`` (lossless; WebP has no grey mode, so grey images come back as three equal channels).

An 8-bit JPEG or PNG that needs no resizing and would be stored in its own format keeps its bytes (re-encoding a
JPEG only adds loss). The boxes of the row (a visual-grounding region, detection boxes) are scaled by the exact
per-axis ratios of the new size, and the original size is kept in the row (``ORIGINAL_SIZE_COLUMNS``).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

ENCODINGS = ("source", "jpeg", "png", "webp")
ORIGINAL_SIZE_COLUMNS = ("image_original_width", "image_original_height")
# Shorter side the pretraining image-text transforms draw at most (OFA np.arange(patch_image_size, 481)); the
# documented --max-shorter-side for pretraining captions, VQA and grounding.
PRETRAIN_MAX_SHORTER_SIDE = 480


@dataclass(frozen=True)
class ImagePreparation:
    """How conversion prepares each image; all ``None`` / ``"source"`` is "off" (images are stored as they come)."""

    max_side: int | None = None  # longer side at most this many pixels
    max_shorter_side: int | None = None  # shorter side at most this many pixels
    encoding: str | None = None  # one of ENCODINGS; None = off unless a size limit is set (then "source")
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        for name in ("max_side", "max_shorter_side"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 16):
                flag = {"max_side": "--max-image-side", "max_shorter_side": "--max-shorter-side"}[name]
                raise ValueError(f"{name} ({flag}) must be a whole number of pixels >= 16, got {value!r}")
        if self.encoding is not None and self.encoding not in ENCODINGS:
            raise ValueError(
                f"image encoding (--image-encoding) {self.encoding!r} is not one of {', '.join(ENCODINGS)}"
            )
        if not (isinstance(self.jpeg_quality, int) and 1 <= self.jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality (--jpeg-quality) must be 1..100, got {self.jpeg_quality!r}")

    @property
    def enabled(self) -> bool:
        return self.max_side is not None or self.max_shorter_side is not None or self.encoding is not None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "encoding": self.encoding or "source"}

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the limits: the aspect ratio kept, the limiting side exactly at its limit."""
        scale = 1.0
        longer, shorter = max(width, height), min(width, height)
        if self.max_side is not None:
            scale = min(scale, self.max_side / longer)
        if self.max_shorter_side is not None:
            scale = min(scale, self.max_shorter_side / shorter)
        if scale >= 1.0:
            return width, height
        return max(1, round(width * scale)), max(1, round(height * scale))

    def stored_format(self, source_format: str) -> str:
        encoding = self.encoding or "source"
        if encoding == "source":
            return "JPEG" if source_format == "JPEG" else "PNG"
        return {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[encoding]


@dataclass(frozen=True)
class PreparedImage:
    data: bytes | None  # the new encoded image, or None: the source bytes are kept
    width: int
    height: int
    original_width: int
    original_height: int
    grey: bool
    stored_format: str

    @property
    def resized(self) -> bool:
        return (self.width, self.height) != (self.original_width, self.original_height)


def _is_grey(image: Image.Image) -> bool:
    if image.mode == "L":
        return True
    if image.mode != "RGB":
        return False
    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def encode(image: Image.Image, stored_format: str, jpeg_quality: int = 95) -> bytes:
    """``image`` (mode L or RGB) in ``stored_format`` (JPEG with 4:4:4 chroma, PNG, lossless WebP)."""
    buffer = io.BytesIO()
    if stored_format == "JPEG":
        image.save(buffer, "JPEG", quality=jpeg_quality, subsampling=0)
    elif stored_format == "PNG":
        image.save(buffer, "PNG")
    elif stored_format == "WEBP":
        image.save(buffer, "WEBP", lossless=True)
    else:  # pragma: no cover - stored_format comes from ImagePreparation.stored_format
        raise AssertionError(f"unknown stored format {stored_format!r}")
    return buffer.getvalue()


def prepare_image(
    image: Image.Image, source_format: str, as_stored: bool, preparation: ImagePreparation
) -> PreparedImage:
    """Prepare one decoded image (``decode_image(..., keep_grey=True)``).

    ``as_stored``: the decoder returned the stored 8-bit pixels themselves (an 8-bit RGB or grey JPEG/PNG), so the
    source bytes can stay when no resizing is needed and the stored format would not change.
    """
    width, height = image.size
    new_w, new_h = preparation.target_size(width, height)
    grey = _is_grey(image)
    stored = preparation.stored_format(source_format)
    resized = (new_w, new_h) != (width, height)
    # A grey image held as RGB is rewritten as one channel only where that adds no loss (JPEG would re-quantise).
    needs_channel_change = grey and image.mode == "RGB" and stored != "JPEG"
    if as_stored and not resized and stored == source_format and not needs_channel_change:
        return PreparedImage(None, width, height, width, height, grey, source_format)
    if grey and image.mode != "L":
        image = image.convert("L")  # three equal channels: the first one, exactly
    if resized:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    data = encode(image, stored, preparation.jpeg_quality)
    # WebP has no grey mode: Pillow stores a grey image as RGB, so it decodes as three (equal) channels.
    return PreparedImage(data, new_w, new_h, width, height, grey and stored != "WEBP", stored)


def scale_row_boxes(row: dict[str, Any], prepared: PreparedImage) -> None:
    """Scale the row's boxes (``box`` of a visual-grounding row, ``boxes`` of a detection row) to the new size."""
    if not prepared.resized:
        return
    sx, sy = prepared.width / prepared.original_width, prepared.height / prepared.original_height
    if row.get("box") is not None:
        x0, y0, x1, y1 = row["box"]
        row["box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
    for box in row.get("boxes") or ():
        box["x0"], box["x1"] = box["x0"] * sx, box["x1"] * sx
        box["y0"], box["y1"] = box["y0"] * sy, box["y1"] * sy


def prepared_schema(schema: pa.Schema) -> pa.Schema:
    """A kind's Parquet schema with the original image size columns (before ``source_line``, which stays last)."""
    fields = list(schema)
    extra = [pa.field(name, pa.int32()) for name in ORIGINAL_SIZE_COLUMNS]
    return pa.schema([*fields[:-1], *extra, fields[-1]])


def prepare_row(row: dict[str, Any], image: Image.Image, source_format: str, as_stored: bool,
                preparation: ImagePreparation) -> PreparedImage:  # fmt: skip
    """Prepare the row's ``image`` column in place (bytes, boxes, original size); returns what was done."""
    prepared = prepare_image(image, source_format, as_stored, preparation)
    if prepared.data is not None:
        row["image"] = prepared.data
    scale_row_boxes(row, prepared)
    row[ORIGINAL_SIZE_COLUMNS[0]], row[ORIGINAL_SIZE_COLUMNS[1]] = prepared.original_width, prepared.original_height
    return prepared
