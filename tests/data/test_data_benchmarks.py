"""benchmarks/data_pipeline.py and benchmarks/image_encodings.py at the smallest sizes: they run end to end on a
radiograph-like corpus (16-bit PNG and DICOM rows included) and their JSON is self-consistent."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("single_process")


def test_data_pipeline_benchmark_runs_and_its_ratios_follow_from_its_figures(tmp_path: Path) -> None:
    """Run as a user runs it, in a process of its own: in this one, the streaming datasets it iterates would leave
    hundreds of shared-memory descriptors open for the rest of the test session."""
    out = tmp_path / "result.json"
    argv = ["--image-size", "256", "--rows", "12", "--repeats", "1", "--workers", "0", "--check-rows", "12",
            "--data-dir", str(tmp_path / "data"), "--json", str(out),
            "--plot", str(tmp_path / "chart.png")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "data_pipeline.py"), *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    formats = results["corpus"]["formats"]
    assert formats.get("dicom_ct16", 0) > 0 and formats.get("png_grey16", 0) > 0  # the 16-bit rows were read
    table = results["modes"]["in-process (1 core)"]
    for name in ("original", "today", "prepared"):
        row = table[name]
        assert row["per_cpu_s"] > 0
        assert math.isclose(row["per_cpu_s_vs_original"], row["per_cpu_s"] / table["original"]["per_cpu_s"])
    assert results["check"]["today"]["bins_off_by_one"] == 0
    for row in results["feeding"]:
        rows_per_s = 0.4 * 989e12 / (row["tflop_per_example"] * 1e12) / 2
        assert math.isclose(row["rows_per_s"], rows_per_s, rel_tol=1e-9)
        assert math.isclose(row["cores"]["prepared"], rows_per_s / table["prepared"]["per_cpu_s"], rel_tol=1e-9)
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_image_encodings_benchmark_reports_every_encoding(tmp_path: Path) -> None:
    bench = _load("image_encodings")
    out = tmp_path / "encodings.json"
    assert bench.main(["--image-size", "640", "--images", "2", "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    encodings = results["encodings"]
    assert set(encodings) == {"JPEG q95", "JPEG q90", "PNG", "WebP lossless"}
    assert encodings["PNG"]["max_err"] == 0 and encodings["WebP lossless"]["max_err"] == 0  # lossless
    assert encodings["JPEG q90"]["bytes"] < encodings["JPEG q95"]["bytes"] < encodings["PNG"]["bytes"]
