"""Consolidation runs where only torch, transformers and DeepSpeed are installed (a GPU image, benchmarks/gpu_check.sh):
it must not import the data pipeline (pyarrow, PIL, mosaicml-streaming) or MLflow."""

from __future__ import annotations

import subprocess
import sys


def test_consolidation_imports_neither_the_data_pipeline_nor_mlflow() -> None:
    code = (
        "import sys, biomedgpt.checkpoint.consolidate\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('biomedgpt.data', 'biomedgpt.train', 'mlflow', "
        "'streaming'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == []
