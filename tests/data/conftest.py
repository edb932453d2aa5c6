"""Fixtures for the conversion and streaming tests: tiny PNG/JPEG images and valid TSV rows of every kind."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

CODES = " ".join(str((i * 37) % 8192) for i in range(256))


def image_bytes(seed: int, size: int = 8, fmt: str = "PNG") -> bytes:
    """A small image whose pixels depend on ``seed`` (so every row's image differs)."""
    im = Image.new("RGB", (size, size), ((seed * 53) % 256, (seed * 97) % 256, (seed * 11) % 256))
    im.putpixel((seed % size, (seed // size) % size), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()


def good_row(kind: str, i: int) -> list[str]:
    """A valid row of ``kind`` in its default (producer-file) column order."""
    img = b64(image_bytes(i))
    if kind == "vision_language":
        t = ("caption", "qa", "visual_grounding")[i % 3]
        if t == "caption":
            return [f"vl{i}", img, f"a chest x-ray number {i}", "", "", "lung&&heart", "medicat", "caption"]
        if t == "qa":
            return [f"vl{i}", img, "", f"is there a fracture {i}?", "1.0|!+yes&&0.5|!+no", "", "pathvqa", "qa"]
        # Boxes lie inside the 8x8 image (the converter rejects boxes past the image).
        return [f"vl{i}", img, f"the left lung {i}", "", "1,2,6.5,8", "", "vg", "visual_grounding"]
    if kind == "text":
        return [f"t{i}", f"sentence number {i} about the liver."]
    if kind == "image":
        return [f"im{i}", img, CODES]
    if kind == "detection":
        return [f"d{i}", img, "1,2,7,8,3,liver&&0,0,5.5,6,1,bone, left"]
    if kind == "vqa":
        return [f"q{i}", f"img{i}", f"what organ {i}?", "1|!+liver", "abdomen", img]
    if kind == "caption":
        return [f"c{i}", f"img{i}", f"caption {i} of the image", "", img]
    if kind == "summarization":
        return [f"long question {i} about a drug", f"summary {i}"]
    if kind == "nli":
        return [f"premise {i}", f"hypothesis {i}", str(i % 3), f"clinical:{i}"]
    if kind == "classification":
        return [img, str(i % 4), f"class_{i % 4}"]
    raise ValueError(kind)


def tsv_bytes(rows: list[list[str] | bytes]) -> bytes:
    """Join rows with tabs and newlines; a ``bytes`` row is written verbatim (for corrupted lines)."""
    return b"".join((r if isinstance(r, bytes) else "\t".join(r).encode()) + b"\n" for r in rows)


@pytest.fixture
def write_tsv(tmp_path: Path) -> Callable[..., Path]:
    def _write(rows: list[list[str] | bytes], name: str = "input.tsv", trailing_newline: bool = True) -> Path:
        data = tsv_bytes(rows)
        if not trailing_newline:
            data = data[:-1]
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return _write


@pytest.fixture(scope="session")
def tsvkit() -> object:
    """The helpers above for test modules (conftest modules are not importable by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(image_bytes=image_bytes, b64=b64, good_row=good_row, tsv_bytes=tsv_bytes, CODES=CODES)


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process streaming datasets are one rank, whatever distributed variables the environment carries."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
