"""``biomedgpt-sample-data``: write a small, deterministic BiomedGPT-format corpus for tests and demos.

Examples::

    biomedgpt-sample-data data/sample                      # default: 64 rows per unit, seed 0, 96 px images
    biomedgpt-sample-data data/big --rows 512 --seed 3 --image-size 128

The files (pretraining ``vision_language.tsv``/``text.tsv``/``image.tsv``/``detection.tsv`` with the
``negative_sample/`` side files, and VQA/caption/summarization/NLI/classification fine-tuning splits) are
described in :mod:`biomedgpt.data.sample_corpus`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from biomedgpt.data.sample_corpus import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_ROWS,
    DEFAULT_SEED,
    write_sample_corpus,
)

# Files written, in order, at the default layout (manifest.json excluded): the progress bar's total.
_NUM_FILES = 4 + 3 + 5 * 3 + 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biomedgpt-sample-data", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing; files are overwritten)")
    p.add_argument(
        "--rows",
        type=int,
        default=DEFAULT_ROWS,
        help=f"scale of the corpus: VL rows per type and fine-tuning train rows (default {DEFAULT_ROWS})",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        metavar="PX",
        help=f"side of VL/fine-tuning images (default {DEFAULT_IMAGE_SIZE}); image.tsv rows are always 256x256",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary table")
    return p


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns 0 on success, 2 on bad arguments (message on stderr)."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, quiet=args.quiet)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    try:
        with Progress(
            TextColumn("[bold]sample corpus"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} files"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("", total=_NUM_FILES)

            def on_file(name: str, n: int) -> None:
                counts[name] = n
                progress.update(task, advance=1, description=name)

            paths = write_sample_corpus(
                args.out_dir, rows=args.rows, seed=args.seed, image_size=args.image_size, progress=on_file
            )
    except ValueError as e:
        print(f"biomedgpt-sample-data: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start

    out = Path(args.out_dir)
    table = Table(title=f"wrote {out} (seed {args.seed}, rows {args.rows}, image size {args.image_size})")
    table.add_column("file")
    table.add_column("rows/entries", justify="right")
    table.add_column("size", justify="right")
    total = 0
    for name, path in paths.items():
        size = path.stat().st_size
        total += size
        table.add_row(str(path.relative_to(out)), str(counts.get(name, "")), _human(size))
    console.print(table)
    console.print(f"{len(paths)} files, {_human(total)} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
