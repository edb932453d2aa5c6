"""Reading images as a clinician hands them over (PNG, JPEG or DICOM) and turning them into model input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# BiomedGPT normalises every dataset to [-1, 1] with mean = std = 0.5 (spec 1.8).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def dicom_to_image(data: bytes, source: str = "<bytes>") -> Image.Image:
    """First frame of a DICOM file as an 8-bit RGB image, windowed to its own min/max (rescale slope applied)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as error:  # pydicom raises many types for unreadable or compressed data
        raise ValueError(f"{source}: cannot read DICOM pixel data ({error})") from error
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[0]  # multi-frame: first frame
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 255.0 - scaled  # MONOCHROME1 shows low values bright
    return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")


def decode_image(data: bytes, source: str = "<bytes>") -> Image.Image:
    """Encoded image bytes (any PIL format, or DICOM) -> RGB PIL image; errors name the source."""
    if is_dicom(data):
        return dicom_to_image(data, source)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
                # Already RGB: return the decoded image itself (load() detaches it from the buffer) instead of a
                # converted copy, which would allocate and fill a second full-size image (as costly as half the
                # JPEG decode). Same pixels either way; other formats (multi-frame ones too) take the copy.
                image.load()
                return image
            return image.convert("RGB")
    except Exception as error:
        raise ValueError(f"{source}: not a readable image ({error})") from error


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return decode_image(path.read_bytes(), str(path))


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
