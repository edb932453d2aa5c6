"""Fixtures for the tracking tests: one real SQLite MLflow store per session (schema migrations take seconds)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from biomedgpt.tracking import MLflowTracker


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own MLFLOW_TRACKING_URI / MLFLOW_RUN_ID / RANK / proxy must not leak into the tests.
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "RANK",
        "SLURM_PROCID",
        "OMPI_COMM_WORLD_RANK",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An SQLite tracking URI whose schema is already created (shared; tests use their own experiments)."""
    from mlflow import MlflowClient

    db: Path = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()  # runs the migrations once
    return uri


@pytest.fixture
def client(mlflow_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri)


@pytest.fixture
def experiment_name(request: pytest.FixtureRequest) -> str:
    return "exp-" + re.sub(r"[^\w.-]", "_", request.node.name)


@pytest.fixture
def make_tracker(mlflow_uri: str, experiment_name: str) -> Iterator[Callable[..., MLflowTracker]]:
    """Trackers on the session store with test-friendly defaults; any left open are finished at teardown."""
    made: list[MLflowTracker] = []

    def make(**kwargs: Any) -> MLflowTracker:
        opts: dict[str, Any] = {
            "tracking_uri": mlflow_uri,
            "experiment_name": experiment_name,
            "enabled": True,
            "system_metrics": False,
            "watchdog": False,
            "batch_interval_s": 0.1,
        }
        opts.update(kwargs)
        tracker = MLflowTracker(**opts)
        made.append(tracker)
        return tracker

    yield make
    for tracker in made:
        tracker.finish(timeout_s=10)
