"""Turn the sample corpus's small synthetic images into radiograph-sized, realistically encoded ones, in place.

The sample corpus (``biomedgpt.data.sample_corpus``) draws 64-96 px colour shapes on a smooth background: such images
decode in microseconds and compress to almost nothing, so a data-pipeline benchmark on them measures Python overhead
rather than what a real radiology corpus costs (decoding 2,000-3,000 px films, 16-bit exports, DICOM slices).
:func:`rewrite_as_radiographs` replaces the images of ``vision_language.tsv`` and ``detection.tsv`` with
radiograph-like content and keeps every row's text, so the same rows exercise the decoders a real corpus needs:

* content: smooth large-scale structure (an exposure gradient, a bright body, two darker lung fields, a few wide
  blobs, low-frequency noise), generated at low resolution and upsampled, plus fine per-pixel noise so that JPEG and
  PNG compress like scanned films rather than like flat synthetic shapes; about ``image_size`` px on the longer side,
  the shorter side 0.75-1.0 of it (portrait or landscape), decided per row;
* stored encodings, mixed deterministically per row: 8-bit grey JPEG (q90), grey stored as 3-channel RGB JPEG (as
  many PACS exports do), 8-bit grey PNG, 16-bit grey PNG holding 12 significant bits (0..4095, mode I;16; one in two
  states them in an sBIT chunk, the other leaves the bit depth to be inferred), and every ``dicom_every``-th row a
  512 x 512 CT slice as an uncompressed 16-bit DICOM file (12 bits stored, rescale -1024 to HU, window 40/400);
* boxes (the refs of visual_grounding rows, detection labels) are scaled to the new width and height, so they keep
  their meaning and stay inside the image.

Every row draws from a numpy generator seeded from ``(seed, file, row index)``; Pillow and pydicom embed no timestamps
here, so the same corpus and arguments give byte-identical files. The summary is also stored in
``manifest.json`` under ``"radiographs"`` (and its ``"image_size"`` is set), for the benchmark to print.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

# Stored encodings, in the order the non-DICOM rows of a file cycle through them (so a small corpus has them all).
# png_grey16_sbit states its 12 bits in an sBIT chunk; png_grey16 leaves the depth to be inferred, as many exports do.
CYCLED_FORMATS: tuple[str, ...] = ("jpeg_grey", "jpeg_rgb", "png_grey8", "png_grey16", "png_grey16_sbit")
DICOM_FORMAT = "dicom_ct16"
FORMATS: tuple[str, ...] = (*CYCLED_FORMATS, DICOM_FORMAT)
DICOM_SIZE = 512  # CT slices are 512 x 512 whatever the radiograph size
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 1
LOW_RES = 96  # longer side of the grid the large-scale structure is drawn on
# CT stored values: HU + 1024 (RescaleIntercept -1024); a soft-tissue window as the file's VOI.
CT_INTERCEPT = -1024
CT_WINDOW = (40, 400)
MAX_IMAGE_SIZE = 8192  # beyond this Pillow's decompression-bomb check (which conversion treats as an error) fires

# Image column and box column of each rewritten file; vision_language boxes only on visual_grounding rows.
_FILES = {
    "vision_language": {"columns": 8, "image": 1, "box": 4, "type": 7},
    "detection": {"columns": 3, "image": 1, "box": 2, "type": None},
}


def _row_rng(seed: int, name: str, index: int) -> np.random.Generator:
    # crc32 of the file name (not hash()): stable across processes, and the two files get different images.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def _row_format(index: int, dicom_every: int) -> str:
    """Every ``dicom_every``-th row (1-based) is DICOM; the rows in between cycle through :data:`CYCLED_FORMATS`."""
    if dicom_every and (index + 1) % dicom_every == 0:
        return DICOM_FORMAT
    before = index - ((index + 1) // dicom_every if dicom_every else 0)  # non-DICOM rows before this one
    return CYCLED_FORMATS[before % len(CYCLED_FORMATS)]


# --------------------------------------------------------------------------------------------- content


def _gaussian(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2) / 2.0)


def _upsample(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """Float grid -> ``height x width`` float32 (PIL bicubic in mode F: fast, smooth, no blocky bilinear creases)."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def _film_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Large-scale radiograph-like intensity in [0, 1] (``height x width`` float32), before any pixel noise.

    Drawn on a grid of :data:`LOW_RES` px on the longer side, so the cost is one resize whatever the output size.
    """
    scale = LOW_RES / max(width, height)
    gw, gh = max(8, round(width * scale)), max(8, round(height * scale))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    xx, yy = xx / (gw - 1), yy / (gh - 1)
    # Exposure falloff across the film, a bright body and two darker (air-filled) fields, as on a chest film.
    field = 0.15 + rng.uniform(-0.1, 0.1) * xx + rng.uniform(-0.15, 0.05) * yy
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)
    field = field + 0.55 * _gaussian(xx, yy, cx, cy, rng.uniform(0.22, 0.3), rng.uniform(0.28, 0.4))
    for side in (-1.0, 1.0):
        lx = cx + side * rng.uniform(0.14, 0.2)
        field = field - rng.uniform(0.25, 0.35) * _gaussian(xx, yy, lx, cy - 0.05, 0.08, rng.uniform(0.14, 0.2))
    for _ in range(int(rng.integers(3, 9))):  # nodules, organs, overlapping soft tissue
        amp = rng.uniform(-0.15, 0.25)
        sigma = rng.uniform(0.02, 0.12)
        field = field + amp * _gaussian(xx, yy, rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), sigma, sigma)
    coarse = rng.normal(0.0, 0.06, size=(6, 6))  # low-frequency mottle
    field = field + _upsample(coarse, gw, gh)
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    # Mid-frequency texture (trabecular / parenchymal grain) added at 1/8 resolution, so that only one resize runs
    # at full size; the fine pixel noise comes later, with the encoding's bit depth.
    mw, mh = max(gw, width // 8), max(gh, height // 8)
    mid = _upsample(field, mw, mh) + rng.normal(0.0, 0.015, size=(mh, mw)).astype(np.float32)
    full = _upsample(mid, width, height)  # read-only view of the PIL image: clipped into a new array
    return np.clip(full, 0.0, 1.0)  # bicubic overshoots a little at sharp extremes


def _grey8(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """8-bit film: the field in 4..244 plus uniform 0..8 noise, minus 4 (uint8 all the way: no overflow, cheap)."""
    pixels = (field * 240.0 + 4.0).astype(np.uint8)
    pixels += rng.integers(0, 9, size=pixels.shape, dtype=np.uint8)
    pixels -= 4
    return pixels


def _grey12(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """12-bit film in uint16: the field in 40..4000 plus uniform 0..80 noise, minus 40 (max 4040 <= 4095, and the
    field's maximum 1 keeps it above 2047, so a decoder inferring the depth from the maximum finds 12 bits)."""
    pixels = (field * 3960.0 + 40.0).astype(np.uint16)
    pixels += rng.integers(0, 81, size=pixels.shape, dtype=np.uint16)
    pixels -= 40
    return pixels


def _ct_slice(rng: np.random.Generator) -> np.ndarray:
    """512 x 512 stored CT values (HU + 1024, uint16 in 0..4095): air, an elliptic body of soft tissue with two lungs
    and a spine, smooth density variation and quantum noise of about 12 HU."""
    n = DICOM_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.52 + rng.uniform(-0.03, 0.03)
    rx, ry = rng.uniform(0.36, 0.44), rng.uniform(0.28, 0.36)
    body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu += body * (_film_field(rng, n, n) - 0.5) * 120.0  # fat/muscle/organ contrast inside the window
    for side in (-1.0, 1.0):
        lx, lrx, lry = cx + side * rx * 0.45, rx * rng.uniform(0.3, 0.38), ry * rng.uniform(0.55, 0.7)
        lung = ((xx - lx) / lrx) ** 2 + ((yy - cy + 0.02) / lry) ** 2 <= 1.0
        hu[lung] = -850.0 + 60.0 * (yy[lung] - cy)  # dependent lung is a little denser
    spine = ((xx - cx) / 0.045) ** 2 + ((yy - (cy + ry * 0.7)) / 0.05) ** 2 <= 1.0
    hu[spine] = rng.uniform(600.0, 900.0)
    hu += rng.integers(-20, 21, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu) - CT_INTERCEPT, 0, 4095).astype(np.uint16)


# --------------------------------------------------------------------------------------------- encodings


def _png(image: Image.Image, sbit: int | None = None) -> bytes:
    buffer = io.BytesIO()
    info = None
    if sbit is not None:
        # Pillow writes ancillary chunks before IDAT, where PNG requires sBIT to be.
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    # zlib level 1: 3-8x faster to write than the default 6 on noisy films, files only 6-16% larger, and inflating
    # them (what a pipeline pays) costs about the same whatever level wrote them.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)  # default 4:2:0 for RGB, as typical exports
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, uid_seed: list[str]) -> bytes:
    """An uncompressed (Explicit VR Little Endian) single-frame CT DICOM Part 10 file of ``pixels`` (uint16)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    # UIDs from fixed entropy (no clock, no random): the same row always gets the same file bytes.
    instance = generate_uid(entropy_srcs=[*uid_seed, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "series"])
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "Synthetic^Radiograph"
    ds.PatientID = "SYNTHETIC"
    ds.InstanceNumber = 1
    ds.SliceThickness = "1.0"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = str(CT_INTERCEPT)
    ds.RescaleType = "HU"
    ds.WindowCenter = str(CT_WINDOW[0])
    ds.WindowWidth = str(CT_WINDOW[1])
    ds.PixelData = pixels.astype("<u2").tobytes()
    buffer = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        dcmwrite(buffer, ds, enforce_file_format=True)  # writes the preamble and completes the file meta
    else:  # pydicom 2.x: the encoding lives on the dataset, write_like_original=False adds the file meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        dcmwrite(buffer, ds, write_like_original=False)
    return buffer.getvalue()


def make_radiograph(rng: np.random.Generator, fmt: str, image_size: int, uid_seed: list[str]) -> tuple[bytes, int, int]:
    """Encoded bytes, width and height of one new image of format ``fmt``."""
    if fmt == DICOM_FORMAT:
        return _dicom(_ct_slice(rng), uid_seed), DICOM_SIZE, DICOM_SIZE
    short = round(image_size * rng.uniform(0.75, 1.0))
    width, height = (short, image_size) if rng.random() < 0.6 else (image_size, short)  # films are mostly portrait
    field = _film_field(rng, width, height)
    if fmt in ("png_grey16", "png_grey16_sbit"):
        sbit = 12 if fmt == "png_grey16_sbit" else None
        return _png(Image.fromarray(_grey12(rng, field)), sbit), width, height
    grey = Image.fromarray(_grey8(rng, field))
    if fmt == "jpeg_grey":
        return _jpeg(grey), width, height
    if fmt == "jpeg_rgb":
        return _jpeg(grey.convert("RGB")), width, height
    if fmt == "png_grey8":
        return _png(grey), width, height
    raise ValueError(f"unknown format {fmt!r}")


def _old_size(b64: str) -> tuple[int, int]:
    """Width and height of a stored image (PIL formats; DICOM too, so rewriting a rewritten corpus works)."""
    data = base64.urlsafe_b64decode(b64.strip())  # also accepts the standard alphabet, as OFA's reader does
    if data[128:132] == b"DICM":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    with Image.open(io.BytesIO(data)) as image:
        return image.size


# --------------------------------------------------------------------------------------------- boxes


def _num(value: float) -> str:
    """Up to 2 decimals, no trailing zeros ("12.5", "128")."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _scale_box(parts: list[str], sx: float, sy: float, width: int, height: int) -> list[str]:
    x0, y0, x1, y1 = (float(p) for p in parts)
    # Clamped to the image: a box touching the old border must not poke past the new one through rounding.
    box = (min(x0 * sx, width), min(y0 * sy, height), min(x1 * sx, width), min(y1 * sy, height))
    return [_num(v) for v in box]


def _scale_detection(label: str, sx: float, sy: float, width: int, height: int) -> str:
    entries = []
    for entry in label.split("&&"):
        parts = entry.split(",", 5)  # the category name may contain commas
        if len(parts) != 6:
            raise ValueError(f"detection entry {entry!r} is not x0,y0,x1,y1,cat_id,cat_name")
        entries.append(",".join(_scale_box(parts[:4], sx, sy, width, height) + parts[4:]))
    return "&&".join(entries)


# --------------------------------------------------------------------------------------------- entry point


def _rewrite_file(path: Path, name: str, image_size: int, seed: int, dicom_every: int, stats: dict[str, Any]) -> int:
    layout = _FILES[name]
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    # Streamed row by row through a temporary file: a corpus at 2,000+ px does not need to fit in memory twice.
    with open(path, encoding="utf-8", newline="") as src, open(tmp, "w", encoding="utf-8", newline="") as dst:
        for index, line in enumerate(src):
            body = line.rstrip("\n")
            ending = line[len(body) :]
            columns = body.split("\t")
            if len(columns) != layout["columns"]:
                raise ValueError(f"{path}:{index + 1}: {len(columns)} columns, expected {layout['columns']}")
            fmt = _row_format(index, dicom_every)
            old_w, old_h = _old_size(columns[layout["image"]])
            rng = _row_rng(seed, name, index)
            data, width, height = make_radiograph(rng, fmt, image_size, [str(seed), name, str(index)])
            columns[layout["image"]] = base64.b64encode(data).decode("ascii")
            sx, sy = width / old_w, height / old_h
            box_col = layout["box"]
            if layout["type"] is None:
                columns[box_col] = _scale_detection(columns[box_col], sx, sy, width, height)
                stats["boxes_scaled"] += columns[box_col].count("&&") + 1
            elif columns[layout["type"]] == "visual_grounding":
                parts = columns[box_col].split(",")
                if len(parts) != 4:
                    raise ValueError(f"{path}:{index + 1}: region box {columns[box_col]!r} is not x0,y0,x1,y1")
                columns[box_col] = ",".join(_scale_box(parts, sx, sy, width, height))
                stats["boxes_scaled"] += 1
            dst.write("\t".join(columns) + ending)
            stats["formats"][fmt] += 1
            stats["bytes"][fmt] += len(data)
            if fmt != DICOM_FORMAT:
                stats["shorter"].append(min(width, height))
                stats["orientation"]["portrait" if height > width else "landscape"] += 1
            rows += 1
    os.replace(tmp, path)
    return rows


def rewrite_as_radiographs(corpus: Path, image_size: int, seed: int = 0, dicom_every: int = 5) -> dict[str, Any]:
    """Replace the images of ``corpus/vision_language.tsv`` and ``corpus/detection.tsv`` with radiograph-like ones.

    ``image_size`` is the longer side of the radiographs (DICOM slices are always 512 x 512); every ``dicom_every``-th
    row of each file is DICOM (0: none). Row text is kept, boxes are scaled to the new size. Returns a summary (rows
    per file, images per stored format, mean encoded bytes per format and overall, sizes) that is also written to
    ``corpus/manifest.json`` under ``"radiographs"``, whose ``"image_size"`` becomes ``image_size``.
    """
    corpus = Path(corpus)
    if not 16 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in [16, {MAX_IMAGE_SIZE}], got {image_size}")
    if dicom_every < 0:
        raise ValueError(f"dicom_every must be >= 0 (0: no DICOM rows), got {dicom_every}")
    stats: dict[str, Any] = {
        "formats": Counter(),
        "bytes": Counter(),
        "shorter": [],
        "orientation": Counter(),
        "boxes_scaled": 0,
    }
    rows = {}
    for name in _FILES:
        path = corpus / f"{name}.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: rewrite_as_radiographs needs a corpus of write_sample_corpus")
        rows[name] = _rewrite_file(path, name, image_size, seed, dicom_every, stats)

    images = sum(stats["formats"].values())
    total = sum(stats["bytes"].values())
    shorter = stats["shorter"]
    summary: dict[str, Any] = {
        "image_size": image_size,
        "dicom_size": DICOM_SIZE,
        "shorter_side": [min(shorter), max(shorter)] if shorter else None,
        "orientation": dict(sorted(stats["orientation"].items())),
        "seed": seed,
        "dicom_every": dicom_every,
        "rows": rows,
        "formats": {f: stats["formats"][f] for f in FORMATS if stats["formats"][f]},
        "mean_bytes": {f: round(stats["bytes"][f] / stats["formats"][f]) for f in FORMATS if stats["formats"][f]},
        "mean_bytes_per_image": round(total / images) if images else 0,
        "total_bytes": total,
        "boxes_scaled": stats["boxes_scaled"],
    }
    manifest_path = corpus / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    manifest["image_size"] = image_size
    manifest["radiographs"] = summary
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
