"""Reading images as a clinician hands them over (PNG, JPEG or DICOM) and turning them into model input."""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# BiomedGPT normalises every dataset to [-1, 1] with mean = std = 0.5 (OFA data/mm_data/caption_dataset.py).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


# Key of ``image.info`` that names the rule ``decode_image`` used (conversion summaries count it: decoding_kind).
DECODE_INFO_KEY = "biomedgpt_decode"

# Bit depths a grey image in a 16-bit container is assumed to use when the file does not say (PNG sBIT): detectors and
# CT/MR exports store 10, 12 or 14 significant bits in 16-bit words.
GREY_BIT_DEPTHS = (8, 10, 12, 14, 16)

# CT window used when a CT file carries no WindowCenter/WindowWidth: the usual soft-tissue preset (centre 40 HU, width
# 400 HU). Hounsfield units are absolute, so a fixed window shows a tissue with the same grey on every slice and scan.
CT_DEFAULT_WINDOW = (40.0, 400.0)


class ImageDecodeError(ValueError):
    """Image bytes that cannot be decoded correctly; the message starts with the source and says why."""


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def describe_decoding(image: Image.Image) -> str:
    """The rule ``decode_image`` used for ``image`` (e.g. "DICOM CT: window C=40 W=400 from the file, LINEAR")."""
    return str(image.info.get(DECODE_INFO_KEY, "not decoded by biomedgpt.data.images.decode_image"))


# The per-image numbers of a rule, left out when rules are counted over a data set.
_PER_IMAGE_DETAIL = (
    (re.compile(r"\s*\([^)]*\)"), ""),  # "(12 bits: the smallest ... 4095)"
    (re.compile(r"rescale -?[\d.e+-]+\*x[+-][\d.e+-]+"), "rescale"),
    (re.compile(r"min/max -?[\d.e+-]+\.\.-?[\d.e+-]+"), "min/max"),
    (re.compile(r"frame 1 of \d+"), "first frame"),
)


def decoding_kind(image: Image.Image) -> str:
    """:func:`describe_decoding` without the numbers particular to one image (its rescale, its min/max, its frame
    count), so that a conversion can count its images by rule; window settings and bit depths stay."""
    rule = describe_decoding(image)
    for pattern, replacement in _PER_IMAGE_DETAIL:
        rule = pattern.sub(replacement, rule)
    return rule


def _tagged(image: Image.Image, rule: str) -> Image.Image:
    image.info[DECODE_INFO_KEY] = rule
    return image


def _to_uint8(values: np.ndarray) -> np.ndarray:
    # Callers map values into [0, 255] first; the clip only absorbs floating-point rounding at the two ends.
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _min_max(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stretch ``values`` to [0, 255] by their own minimum and maximum (a constant image becomes black)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64), low, high
    return (values.astype(np.float64) - low) / (high - low) * 255.0, low, high


def voi_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI LUT function (PS3.3 C.11.2.1.2, C.11.2.1.3) of modality values -> floats in [0, 255].

    LINEAR: below ``c - 0.5 - (w - 1) / 2`` -> 0, above ``c - 0.5 + (w - 1) / 2`` -> 255, in between
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255`` (needs ``w >= 1``). LINEAR_EXACT: ``((x - c) / w + 0.5) * 255`` clamped
    at ``c -/+ w / 2``. SIGMOID: ``255 / (1 + exp(-4 (x - c) / w))``.
    """
    x = values.astype(np.float64)
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"window width {width:g} is below 1, which the LINEAR VOI function does not allow")
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        if width == 1:  # the ramp has no width: a threshold at the centre
            return np.where(x > high, 255.0, 0.0)
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        return np.where(x <= low, 0.0, np.where(x > high, 255.0, y))
    if width <= 0:
        raise ValueError(f"window width {width:g} is not positive, which the {function} VOI function needs")
    if function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
        return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 255.0, y))
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise ValueError(f"VOILUTFunction {function!r} is not one of LINEAR, LINEAR_EXACT, SIGMOID")


# ----------------------------------------------------------------------------------------------------------------------
# PNG, JPEG, TIFF, ... (Pillow)


def _png_significant_bits(data: bytes) -> int | None:
    """Grey sample depth a PNG states in its sBIT chunk, or None; Pillow does not read sBIT."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"sBIT" and length >= 1:
            return data[position + 8]  # grey (colour types 0 and 4): the first byte is the grey depth
        if kind in (b"IDAT", b"IEND"):  # sBIT must precede the image data
            return None
        position += 12 + length
    return None


def _high_depth_grey(image: Image.Image, data: bytes, source: str) -> tuple[np.ndarray, str]:
    """A grey image with more than 8 bits (Pillow modes I;16*, I, F) -> uint8 grey levels and the rule used."""
    try:
        pixels = np.asarray(image)
    except Exception as error:
        raise ImageDecodeError(
            f"{source}: cannot read the {image.mode} pixels of this {image.format} image ({error})"
        ) from error
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageDecodeError(f"{source}: {image.mode} image of shape {pixels.shape} is not a 2-D grey image")
    what = f"{image.format} {image.mode} grey"
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise ImageDecodeError(f"{source}: {what} image has NaN or infinite pixels; export it with finite values")
        low, high = float(pixels.min()), float(pixels.max())
        if low >= 0.0 and high <= 1.0:
            return _to_uint8(pixels.astype(np.float64) * 255.0), f"{what} in [0, 1] scaled by 255"
        scaled, low, high = _min_max(pixels)
        return _to_uint8(scaled), f"{what} outside [0, 1]: stretched from its min/max {low:g}..{high:g}"
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        scaled, _, _ = _min_max(pixels)
        return _to_uint8(scaled), f"{what} outside 0..65535: stretched from its min/max {low}..{high}"
    stated = _png_significant_bits(data) if image.format == "PNG" else None
    if stated is not None and 1 <= stated <= 16 and high <= 2**stated - 1:
        bits, why = stated, "the file's sBIT"
    else:
        bits = next(b for b in GREY_BIT_DEPTHS if high <= 2**b - 1)
        why = f"the smallest of {'/'.join(map(str, GREY_BIT_DEPTHS))} bits holding its maximum {high}"
        if stated is not None:  # an sBIT the pixels exceed is wrong; trusting it would clip them
            why += f"; sBIT {stated} ignored"
    full = 2**bits - 1
    return _to_uint8(pixels.astype(np.float64) * (255.0 / full)), f"{what} scaled by {full} ({bits} bits: {why})"


def _draft(image: Image.Image, shorter_side: int | None) -> str:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (in the DCT) while its shorter side stays >= ``shorter_side``;
    returns the note for the rule ("" when it decodes at full size)."""
    if shorter_side is None or image.format != "JPEG" or image.mode not in ("L", "RGB"):
        return ""
    width, height = image.size
    factor = shorter_side / min(width, height)
    if factor > 0.5:  # not even half the size would do
        return ""
    image.draft(image.mode, (math.ceil(width * factor), math.ceil(height * factor)))
    scale = round(width / image.size[0])
    return f", drafted at 1/{scale}" if scale > 1 else ""


def _pil_to_rgb(
    image: Image.Image, data: bytes, source: str, keep_grey: bool = False, draft_shorter_side: int | None = None
) -> Image.Image:
    drafted = _draft(image, draft_shorter_side)
    if keep_grey and image.mode == "L" and image.format in ("JPEG", "PNG"):
        image.load()  # one channel as decoded: a third of the bytes of its RGB copy, and no copy made
        return _tagged(image, f"{image.format} 8-bit grey as stored{drafted}")
    if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
        # Already RGB: return the decoded image itself (load() detaches it from the buffer) instead of a
        # converted copy, which would allocate and fill a second full-size image (as costly as half the
        # JPEG decode). Same pixels either way; other formats (multi-frame ones too) take the copy.
        image.load()
        # A 16-bit RGB PNG (IHDR bit depth, byte 24) reaches here already cut to 8 bits by Pillow's high byte.
        deep = image.format == "PNG" and data[24:25] == b"\x10"
        rule = "PNG 16-bit RGB: high byte (Pillow)" if deep else f"{image.format} 8-bit RGB as stored{drafted}"
        return _tagged(image, rule)
    if image.mode.startswith("I") or image.mode == "F":
        grey, rule = _high_depth_grey(image, data, source)
        return _tagged(_grey_image(grey, keep_grey), rule)
    frames = getattr(image, "n_frames", 1)
    grey_mode = keep_grey and image.mode in ("L", "LA", "La", "1")
    rule = f"{image.format} {image.mode} converted to {'grey' if grey_mode else 'RGB'} by Pillow{drafted}"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rule += " (transparency dropped)"
    if frames > 1:
        rule += f", frame 1 of {frames}"
    return _tagged(image.convert("L" if grey_mode else "RGB"), rule)


def _grey_image(grey: np.ndarray, keep_grey: bool) -> Image.Image:
    image = Image.fromarray(grey)  # uint8 [H, W]: mode L
    return image if keep_grey else image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------------
# DICOM (pydicom)


def _frame_item(dataset: Any, frame: int, sequence: str) -> Any:
    """Where an enhanced (multi-frame) DICOM keeps ``sequence`` for ``frame``: the per-frame functional group, else
    the shared one (PS3.3 C.7.6.16); classic files keep the attributes in the dataset itself."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    shared = dataset.get("SharedFunctionalGroupsSequence")
    for groups in (per_frame[frame : frame + 1] if per_frame else [], shared[:1] if shared else []):
        for group in groups:
            if group.get(sequence):
                return group.get(sequence)[0]
    return dataset


def _first_number(item: Any, keyword: str, source: str) -> float | None:
    """A numeric attribute's first value (WindowCenter and WindowWidth may hold several alternative windows)."""
    value = item.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ImageDecodeError(f"{source}: DICOM {keyword} {value!r} is not a number; fix or remove it") from error


def _dicom_grey(pixels: np.ndarray, dataset: Any, frame: int, source: str) -> tuple[np.ndarray, str]:
    """MONOCHROME1/2 stored values -> 0..255 grey: modality LUT/rescale, then VOI window or fallback, then inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    modality = str(dataset.get("Modality", "") or "?")
    steps = []
    if dataset.get("ModalityLUTSequence"):
        try:
            values = apply_modality_lut(pixels, dataset).astype(np.float64)
        except Exception as error:
            raise ImageDecodeError(f"{source}: cannot apply the DICOM ModalityLUTSequence ({error})") from error
        steps.append("modality LUT")
    else:
        rescale = _frame_item(dataset, frame, "PixelValueTransformationSequence")
        slope = _first_number(rescale, "RescaleSlope", source)
        intercept = _first_number(rescale, "RescaleIntercept", source)
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        values = pixels.astype(np.float64) * slope + intercept
        if (slope, intercept) != (1.0, 0.0):
            steps.append(f"rescale {slope:g}*x{intercept:+g}")
    voi = _frame_item(dataset, frame, "FrameVOILUTSequence")
    center = _first_number(voi, "WindowCenter", source)
    width = _first_number(voi, "WindowWidth", source)
    if (center is None) != (width is None):
        have, lack = ("WindowCenter", "WindowWidth") if width is None else ("WindowWidth", "WindowCenter")
        raise ImageDecodeError(f"{source}: DICOM has {have} but no {lack}; give both or neither")
    if center is not None and width is not None:
        function = str(voi.get("VOILUTFunction", "") or "LINEAR").upper()
        try:
            grey = voi_window(values, center, width, function)
        except ValueError as error:
            raise ImageDecodeError(
                f"{source}: DICOM window C={center:g} W={width:g}: {error}; fix the file's window"
            ) from error
        steps.append(f"window C={center:g} W={width:g} from the file, {function}")
    elif dataset.get("VOILUTSequence"):
        if not np.array_equal(values, np.round(values)):
            raise ImageDecodeError(f"{source}: DICOM VOILUTSequence needs integer modality values, these are not")
        try:
            lut = apply_voi(values.astype(np.int64), dataset)
            depth = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        except Exception as error:
            raise ImageDecodeError(f"{source}: cannot apply the DICOM VOILUTSequence ({error})") from error
        grey = lut.astype(np.float64) * (255.0 / (2**depth - 1))
        steps.append(f"VOI LUT from the file ({depth}-bit entries)")
    elif modality == "CT":
        center, width = CT_DEFAULT_WINDOW
        grey = voi_window(values, center, width)
        steps.append(f"no window in the file: CT default C={center:g} W={width:g}, LINEAR")
    else:
        grey, low, high = _min_max(values)
        steps.append(f"no window in the file: stretched from its min/max {low:g}..{high:g}")
    photometric = str(dataset.PhotometricInterpretation)
    if photometric == "MONOCHROME1":  # PS3.3 C.7.6.3.1.2: low values are shown bright
        grey = 255.0 - grey
        steps.append("inverted (MONOCHROME1)")
    return _to_uint8(grey), f"{photometric} {modality}: " + ", ".join(steps)


def dicom_to_image(data: bytes, source: str = "<bytes>", keep_grey: bool = False) -> Image.Image:
    """First frame of a DICOM Part 10 file as an 8-bit RGB image, or grey (mode L) for a MONOCHROME frame with
    ``keep_grey`` (rules: ``decode_image``)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, get_decoder

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # pydicom raises many types for damaged files
        raise ImageDecodeError(f"{source}: not a readable DICOM file ({error})") from error
    if "PixelData" not in dataset:
        kind = (
            "float pixel data, which is not supported"
            if "FloatPixelData" in dataset or ("DoubleFloatPixelData" in dataset)
            else "no pixel data"
        )
        modality = dataset.get("Modality", "?")
        raise ImageDecodeError(f"{source}: DICOM file (Modality {modality}) has {kind}: it is not an image to decode")
    syntax = getattr(dataset, "file_meta", None) and dataset.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise ImageDecodeError(f"{source}: DICOM file meta has no TransferSyntaxUID, so its pixel encoding is unknown")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise ImageDecodeError(f"{source}: DICOM transfer syntax {syntax} has no pixel decoder ({error})") from error
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as error:
        raise ImageDecodeError(
            f"{source}: DICOM NumberOfFrames {dataset.NumberOfFrames!r} is not a whole number"
        ) from error
    try:
        # Only the first frame is decoded; YBR_FULL/YBR_FULL_422 become RGB here (pydicom's convert_color_space).
        pixels, meta = decoder.as_array(dataset, index=0, as_rgb=True)
    except Exception as error:  # missing plugin (RuntimeError), truncated or inconsistent data, ...
        reason = " ".join(str(error).split())
        raise ImageDecodeError(f"{source}: cannot decode DICOM pixel data ({syntax.name}): {reason}") from error
    photometric = str(meta.get("photometric_interpretation", ""))
    samples = int(meta.get("samples_per_pixel", 1))
    rows, columns = int(meta.get("rows", 0)), int(meta.get("columns", 0))
    expected = (rows, columns) if samples == 1 else (rows, columns, samples)
    if pixels.shape != expected or pixels.size == 0:
        raise ImageDecodeError(f"{source}: DICOM frame has shape {pixels.shape}, expected {expected} from Rows/Columns")
    frame_note = f", frame 1 of {frames}" if frames > 1 else ""
    if photometric in ("MONOCHROME1", "MONOCHROME2") and samples == 1:
        grey, rule = _dicom_grey(pixels, dataset, 0, source)
        return _tagged(_grey_image(grey, keep_grey), f"DICOM {rule}{frame_note}")
    if photometric == "RGB" and samples == 3:
        bits = int(meta.get("bits_stored", 8))
        stored = str(dataset.get("PhotometricInterpretation", "RGB"))
        origin = "" if stored == "RGB" else f" (from {stored})"
        if pixels.min() < 0:
            raise ImageDecodeError(f"{source}: DICOM RGB pixels are signed (PixelRepresentation 1), which RGB forbids")
        exact = bits == 8 and pixels.dtype == np.uint8
        rgb = pixels if exact else _to_uint8(pixels.astype(np.float64) * (255.0 / (2**bits - 1)))
        how = "8 bits as stored" if exact else f"{bits} bits scaled by {2**bits - 1}"
        return _tagged(Image.fromarray(rgb, "RGB"), f"DICOM RGB{origin}, {how}{frame_note}")
    if photometric == "PALETTE COLOR" and samples == 1:
        try:
            colours = apply_color_lut(pixels, dataset)
            depth = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        except Exception as error:
            raise ImageDecodeError(
                f"{source}: cannot apply the DICOM palette colour lookup tables ({error})"
            ) from error
        # 16-bit entries: their high byte, which is exact for 8-bit palettes widened either as v << 8 (this is how
        # pydicom's examples_palette.dcm stores 255: 0xFF00) or as v * 257; scaling by 65535 would turn 0xFF00 into 254.
        # Some writers declare 16-bit entries but store 8-bit values (all <= 255): those are used as they are.
        colours = colours[..., :3]  # an alpha palette gives RGBA: the alpha goes (and is noted)
        if depth <= 8:
            rgb, how = colours, f"{depth}-bit palette"
        elif int(colours.max()) <= 255:
            rgb, how = colours, f"{depth}-bit palette holding 8-bit values, used as they are"
        else:
            rgb, how = colours >> (depth - 8), f"{depth}-bit palette, high byte"
        alpha = " (alpha dropped)" if "AlphaPaletteColorLookupTableData" in dataset else ""
        return _tagged(Image.fromarray(rgb.astype(np.uint8), "RGB"), f"DICOM PALETTE COLOR, {how}{alpha}{frame_note}")
    raise ImageDecodeError(
        f"{source}: DICOM PhotometricInterpretation {photometric!r} with {samples} sample(s) per pixel is not "
        "supported (MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422, JPEG 2000 YBR_ICT/YBR_RCT and PALETTE "
        "COLOR are)"
    )


def decode_image(
    data: bytes, source: str = "<bytes>", keep_grey: bool = False, draft_shorter_side: int | None = None
) -> Image.Image:
    """Encoded image bytes (any Pillow format, or DICOM) -> 8-bit RGB PIL image; errors are ``ValueError``s that start
    with ``source`` and say why. ``describe_decoding(image)`` names the rule used.

    With ``keep_grey`` a grey source (8-bit grey JPEG/PNG, grey with more than 8 bits, MONOCHROME DICOM, grey with
    alpha or bilevel) comes back as one channel (mode L) with the grey levels its RGB copy would repeat three times:
    the transforms work on a third of the bytes, and :class:`biomedgpt.data.transforms.ToUint8Tensor` keeps the one
    channel until the batch is collated.

    ``draft_shorter_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (Pillow's ``draft``, scaling in the
    DCT, which skips most of the inverse transform and colour conversion) as long as its shorter side stays at least
    this many pixels: for callers that shrink it below that anyway (the pretraining caption/VQA draws). The rule then
    ends in ", drafted at 1/N". The rules:

    - 8-bit images: as stored (RGB JPEG/PNG) or Pillow's RGB conversion (grey, palette; alpha dropped). A 16-bit RGB
      PNG arrives cut to 8 bits by Pillow (its high byte, i.e. scaled by the full 16-bit range).
    - Grey with more than 8 bits (16-bit PNG/TIFF, 32-bit integer): scaled by ``2**bits - 1``, where ``bits`` is the
      PNG's sBIT when it states one, else the smallest of 8/10/12/14/16 bits that holds the image's maximum: a 12-bit CT
      export in a 16-bit PNG keeps its grey levels (scaling by 65535 would leave it nearly black, clipping at 255 as
      Pillow's convert does leaves it white), and the scale does not depend on each image's darkest pixel as a min/max
      stretch would. Integers outside 0..65535: min/max stretch. Float (mode F): times 255 when in [0, 1], else
      min/max stretch; NaN/inf are rejected.
    - DICOM: first frame. Grey: RescaleSlope/Intercept (or a Modality LUT), then the file's WindowCenter/WindowWidth
      (first of several; LINEAR, LINEAR_EXACT or SIGMOID VOI function, PS3.3 C.11.2.1.2), else its VOI LUT, else
      for CT the soft-tissue window C=40 W=400, else the frame's min/max; MONOCHROME1 inverted. RGB and YBR_FULL(_422)
      as colour (scaled by BitsStored), PALETTE COLOR through its lookup tables. Other photometric interpretations,
      compressed syntaxes without an installed decoder and files without pixel data are rejected.
    """
    if is_dicom(data):
        return dicom_to_image(data, source, keep_grey)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _pil_to_rgb(image, data, source, keep_grey, draft_shorter_side)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as error:
        raise ImageDecodeError(
            f"{source}: not a readable image: neither a format Pillow reads (PNG, JPEG, TIFF, ...) nor a DICOM Part 10 "
            "file ('DICM' after a 128-byte preamble)"
        ) from error
    except Exception as error:  # truncated or corrupt data, decompression bombs, ...
        raise ImageDecodeError(f"{source}: not a readable image ({error})") from error


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """``decode_image`` of a file's bytes (the path is the error's source)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``[C, H, W]`` uint8 tensor, one channel for a grey (mode L) image, else three (RGB).

    What DataLoader workers hand over: a quarter of the bytes of float32 RGB (a twelfth for grey), normalised on the
    training device (:func:`biomedgpt.data.examples.images_on_device`).
    """
    if image.mode == "L":
        return torch.from_numpy(np.asarray(image).copy()[None])  # copy: PIL's buffer is read-only
    pixels = np.asarray(_as_rgb(image))  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def normalize_image(
    image: Image.Image,
    mean: tuple[float, float, float] = DEFAULT_MEAN,
    std: tuple[float, float, float] = DEFAULT_STD,
) -> torch.Tensor:
    """RGB PIL image (any size, no resize) -> ``[3, H, W]`` float32 tensor ``(pixel / 255 - mean) / std``.

    Computed in float32 exactly as ``(torch.from_numpy(np.asarray(image, np.float32) / 255) - mean) / std`` would
    (same IEEE operations, so bit-identical), but in numpy on a contiguous channel-first copy: torch's elementwise ops
    on the permuted (channels-last) view were the slowest step of the whole image pipeline, several times slower
    than the JPEG decode when torch runs two intra-op threads on a 2-core machine.
    """
    pixels = np.asarray(_as_rgb(image))  # [H, W, 3] uint8
    out = np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32)
    out /= np.float32(255.0)
    out -= np.asarray(mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(out)


def image_to_tensor(
    image: Image.Image,
    size: int,
    mean: tuple[float, float, float] = DEFAULT_MEAN,
    std: tuple[float, float, float] = DEFAULT_STD,
) -> torch.Tensor:
    """Resize to size x size (bicubic, as fine-tuning does) and normalise: [3, size, size] float32."""
    image = _as_rgb(image)
    if image.size != (size, size):  # at its own size PIL's resize would only copy
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return normalize_image(image, mean, std)
