"""Stored encodings of prepared images: bytes per image, encode and decode time, and loss, side by side in one run.

Radiograph-like grey images (``benchmarks/radiograph_corpus.py``: smooth structure with film-like noise) of
``--image-size`` px on the longer side are prepared as ``biomedgpt-convert --max-shorter-side 480`` does (decoded,
shrunk bicubic keeping the aspect ratio, grey as one channel) and stored in each encoding
``biomedgpt.data.image_preparation.encode`` offers. Per encoding: mean bytes per image, encode milliseconds (once,
at conversion), decode milliseconds with the loader's decoder (``decode_image(..., keep_grey=True)``, every step),
and the largest and mean difference from the lossless pixels in 8-bit levels.

It also times what JPEG draft decoding (decoding at 1/2, 1/4 or 1/8 scale in the DCT) would save on unprepared
sources: the full decode of the original JPEG against a draft to the smallest scale that keeps a shorter side of 480.

Run: ``python benchmarks/image_encodings.py`` (about a minute on one core); ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # radiograph_corpus, next to this script

from biomedgpt.data.image_preparation import PRETRAIN_MAX_SHORTER_SIDE, ImagePreparation, encode  # noqa: E402
from biomedgpt.data.images import decode_image  # noqa: E402

ENCODINGS = (("JPEG", 95), ("JPEG", 90), ("PNG", None), ("WEBP", None))


def _timed(function: Any, repeats: int) -> tuple[Any, float]:
    """The result and the median milliseconds of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return result, 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from radiograph_corpus import make_radiograph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=2048, help="longer side of the sources (default 2048)")
    parser.add_argument("--images", type=int, default=12, help="source images (default 12)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per image (default 5)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    preparation = ImagePreparation(max_shorter_side=PRETRAIN_MAX_SHORTER_SIDE)
    sources = [
        make_radiograph(np.random.default_rng(i), "jpeg_grey", args.image_size, [str(i)])[0] for i in range(args.images)
    ]
    figures: dict[str, dict[str, list[float]]] = {}
    draft: dict[str, list[float]] = {"full_ms": [], "draft_ms": []}
    for data in sources:
        source = decode_image(data, keep_grey=True)
        width, height = source.size
        prepared = source.resize(preparation.target_size(width, height), Image.Resampling.BICUBIC)
        lossless = np.asarray(prepared, dtype=np.int16)
        for fmt, quality in ENCODINGS:
            name = f"{fmt} q{quality}" if quality else ("WebP lossless" if fmt == "WEBP" else fmt)
            stored, encode_ms = _timed(functools.partial(encode, prepared, fmt, quality or 95), args.repeats)
            decoded, decode_ms = _timed(functools.partial(decode_image, stored, keep_grey=True), args.repeats)
            pixels = np.asarray(decoded, dtype=np.int16)
            error = np.abs((pixels[..., 0] if pixels.ndim == 3 else pixels) - lossless)  # WebP: grey as RGB
            seen = figures.setdefault(
                name, {"bytes": [], "encode_ms": [], "decode_ms": [], "max_err": [], "mean_err": []}
            )
            seen["bytes"].append(len(stored))
            seen["encode_ms"].append(encode_ms)
            seen["decode_ms"].append(decode_ms)
            seen["max_err"].append(float(error.max()))
            seen["mean_err"].append(float(error.mean()))

        def full(data: bytes = data) -> None:
            Image.open(io.BytesIO(data)).load()

        def drafted(data: bytes = data, size: tuple[int, int] = preparation.target_size(width, height)) -> None:
            image = Image.open(io.BytesIO(data))
            image.draft("L", size)  # the smallest DCT scale that is still at least this size
            image.load()

        draft["full_ms"].append(_timed(full, args.repeats)[1])
        draft["draft_ms"].append(_timed(drafted, args.repeats)[1])

    source_bytes = statistics.mean(len(d) for d in sources)
    print(
        f"{args.images} radiograph-like grey JPEG q90 sources, {args.image_size} px longer side "
        f"({source_bytes / 1024:.0f} KiB each), prepared to shorter side {PRETRAIN_MAX_SHORTER_SIDE}\n"
    )
    print("| stored encoding | KiB per image | encode ms (once) | decode ms (every step) | max / mean error (levels) |")
    print("|---|---:|---:|---:|---:|")
    table = {}
    for name, seen in figures.items():
        row = {key: statistics.mean(values) for key, values in seen.items()}
        row["max_err"] = max(seen["max_err"])
        table[name] = row
        print(
            f"| {name} | {row['bytes'] / 1024:.0f} | {row['encode_ms']:.1f} | {row['decode_ms']:.2f} | "
            f"{row['max_err']:.0f} / {row['mean_err']:.2f} |"
        )
    full_ms, draft_ms = statistics.mean(draft["full_ms"]), statistics.mean(draft["draft_ms"])
    print(
        f"\nJPEG draft decoding of the unprepared sources: full {full_ms:.1f} ms, draft to shorter side >= "
        f"{PRETRAIN_MAX_SHORTER_SIDE} {draft_ms:.1f} ms ({full_ms / draft_ms:.2f}x); prepared JPEG q95 "
        f"{table['JPEG q95']['decode_ms']:.2f} ms ({full_ms / table['JPEG q95']['decode_ms']:.1f}x)"
    )
    if args.json:
        results = {"image_size": args.image_size, "images": args.images, "encodings": table, "draft": draft}
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
