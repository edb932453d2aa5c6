"""Fixtures of the modules that run real demo training jobs: one demo data set and one uninterrupted reference job
for the whole session, so that the SIGKILL tests on one node and on two compare against the same job instead of
each running its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from training_jobs import demo_run_overrides, losses, run_training

from biomedgpt.demo import prepare_demo_data

REFERENCE_STEPS = 4
REFERENCE_EXTRA = ["checkpoint.every_steps=2"]


@dataclass(frozen=True)
class DemoReference:
    run_dir: Path
    store: Path
    steps: int
    extra: list[str]  # the overrides after demo_run_overrides' own
    losses: dict[int, float]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    prepare_demo_data(root, rows=16, image_size=64)
    return root


@pytest.fixture(scope="session")
def demo_reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoReference:
    """The demo job on 2 ranks for REFERENCE_STEPS steps, dropout on, uninterrupted, in an MLflow store of its own
    (a test may add the runs it compares to it)."""
    root = tmp_path_factory.mktemp("demo_reference")
    run_dir, store = root / "reference", root / "mlruns.db"
    run_training(run_dir, "demo", demo_run_overrides(data_root, run_dir, REFERENCE_STEPS, REFERENCE_EXTRA), 2, store)
    reference = losses(run_dir)
    assert sorted(reference) == list(range(1, REFERENCE_STEPS + 1))
    return DemoReference(run_dir, store, REFERENCE_STEPS, REFERENCE_EXTRA, reference)
