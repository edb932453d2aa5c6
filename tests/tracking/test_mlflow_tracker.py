"""MLflowTracker against a real MLflow SQLite store (no mocks): what lands in the store, resume, terminal statuses
(context manager, finish, atexit, SIGKILL via the watchdog), an unreachable server, and disabled ranks."""

from __future__ import annotations

import dataclasses
import http.server
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from biomedgpt.tracking import (
    MLflowTracker,
    TrackingWarning,
    collect_run_params,
    default_tracking_uri,
    flatten_params,
)
from biomedgpt.tracking.params import MAX_PARAM_VALUE_LENGTH

REPO = Path(__file__).resolve().parents[2]

CONFIG = {
    "model": {"size": "tiny", "layers": [4, 4], "dropout": 0.1},
    "optim": {"lr": 1e-4, "betas": [0.9, 0.999]},
    "data": {"tasks": [{"name": "caption", "weight": 1.0}, {"name": "vqa", "weight": 0.5}]},
    "seed": 7,
}


def _tracking_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]


def _wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    # A selector, not select.select: that refuses descriptors above 1023, which a long pytest process reaches
    # (mosaicml-streaming keeps shared-memory descriptors of every dataset an earlier test iterated).
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout_s)
    assert ready, "child did not report in time"
    return proc.stdout.readline().strip()


# ---------------------------------------------------------------------------------------------- params helpers


@dataclasses.dataclass
class _Opt:
    lr: float = 3e-4
    warmup: int = 100


def test_flatten_params_nested_lists_dataclasses_and_limits() -> None:
    flat = flatten_params({**CONFIG, "opt": _Opt(), "bad key!": 1, "long": "x" * 10_000, "empty": {}})
    assert flat["model.size"] == "tiny"
    assert flat["model.layers"] == "[4,4]"  # list of scalars: one JSON value
    assert flat["data.tasks.1.name"] == "vqa"  # list of mappings: flattened by index
    assert flat["opt.warmup"] == "100"
    assert flat["bad key_"] == "1"  # MLflow would reject "!" and the whole batch with it
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH and flat["long"].endswith("...")
    assert flat["empty"] == "{}"
    assert all(isinstance(v, str) for v in flat.values())


def test_collect_run_params_has_provenance() -> None:
    params = collect_run_params(CONFIG, {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, 8)
    assert params["config.optim.lr"] == "0.0001"
    assert params["deepspeed.zero_optimization.stage"] == "3"
    assert params["world_size"] == "8"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    assert params["git.commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert params["versions.mlflow"] == mlflow.__version__
    assert params["versions.python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"versions.torch", "versions.deepspeed", "versions.transformers", "versions.mosaicml-streaming"} <= set(
        params
    )
    assert params["versions.biomedgpt-train"] != ""
    assert params["hostname"] == socket.gethostname()


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    assert MLflowTracker(enabled=True).tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert MLflowTracker(enabled=True).tracking_uri == "http://mlflow.example:5000"
    assert MLflowTracker(enabled=True, tracking_uri="sqlite:////x.db").tracking_uri == "sqlite:////x.db"


# ---------------------------------------------------------------------------------------------- the store


def test_params_metrics_tags_artifacts_land_in_store(make_tracker: Any, client: Any, tmp_path: Path) -> None:
    ds_file = tmp_path / "ds.json"
    ds_file.write_text('{"train_micro_batch_size_per_gpu": 4}')
    tracker = make_tracker(run_name="tiny-pretrain", tags={"size": "tiny", "task": "pretrain"}, watchdog=True)
    run_id = tracker.start(
        collect_run_params(CONFIG, {"zero_optimization": {"stage": 3}}, 2),
        artifacts={"resolved.yaml": CONFIG, "deepspeed": {"zero_optimization": {"stage": 3}}, "ds_file.json": ds_file},
    )
    assert run_id is not None and run_id == tracker.run_id
    assert psutil.pid_exists(tracker.watchdog_pid)

    def log_all() -> None:
        for step in range(200):
            tracker.log_metrics(
                {"loss": 10.0 / (step + 1), "loss/caption": 1.0, "loss/vqa": 2.0, "lr": 1e-4, "samples_per_s": 50},
                step,
            )
        # Non-numbers are skipped and a name MLflow would refuse is repaired, rather than failing the whole batch.
        tracker.log_metrics({"tokens_per_s": 5.0, "not a number": "x", "none": None, "grad norm!": 0.5}, 200)

    # Every MLflow write is held at a gate while the training thread logs: log_metrics must return all the same
    # (it only queues). No wall-clock bound on how fast: a synchronous write would wait at the gate until released.
    gate, original = threading.Event(), MlflowClient.log_batch

    def gated(self: Any, *args: Any, **kwargs: Any) -> Any:
        gate.wait(120)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", gated)
        caller = threading.Thread(target=log_all, daemon=True)
        caller.start()
        caller.join(60)
        returned = not caller.is_alive()
        gate.set()
    assert returned, "log_metrics waited for MLflow"
    tracker.set_tags({"phase": "warmup-done"})
    assert tracker.flush(timeout_s=20)
    watchdog_pid = tracker.watchdog_pid
    tracker.finish()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["config.model.size"] == "tiny"
    assert params["config.data.tasks.0.name"] == "caption"
    assert params["deepspeed.zero_optimization.stage"] == "3"
    assert params["world_size"] == "2"
    assert "git.commit" in params and "versions.torch" in params
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(200))
    assert {m.step: m.value for m in history}[9] == pytest.approx(1.0)
    assert {"loss/caption", "loss/vqa", "lr", "samples_per_s", "tokens_per_s"} <= set(run.data.metrics)
    assert "not a number" not in run.data.metrics and "none" not in run.data.metrics
    assert run.data.metrics["grad norm_"] == 0.5
    tags = run.data.tags
    assert tags["mlflow.runName"] == "tiny-pretrain"
    assert (tags["size"], tags["task"], tags["phase"]) == ("tiny", "pretrain", "warmup-done")
    names = sorted(a.path for a in client.list_artifacts(run_id, "config"))
    assert names == ["config/deepspeed.json", "config/ds_file.json", "config/resolved.yaml"]
    local = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text()) == CONFIG
    # finish() told the watchdog to stand down and reaped it.
    assert tracker.watchdog_pid is None
    assert not psutil.pid_exists(watchdog_pid) or psutil.Process(watchdog_pid).status() == psutil.STATUS_ZOMBIE


def test_resume_continues_same_run(make_tracker: Any, client: Any, experiment_name: str) -> None:
    first = make_tracker(run_name="r", tags={"size": "tiny"})
    run_id = first.start({"optim": {"lr": 1e-4}, "model": {"size": "tiny"}}, artifacts={"resolved.json": {"a": 1}})
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step)
    first.finish("KILLED")  # e.g. SIGTERM from SLURM: checkpoint, then exit
    assert client.get_run(run_id).info.status == "KILLED"

    second = make_tracker(run_id=run_id, tags={"size": "tiny", "note": "requeued"})
    assert (
        second.start(
            {"optim": {"lr": 2e-4}, "model": {"size": "tiny"}, "new": 1}, artifacts={"resolved.json": {"a": 2}}
        )
        == run_id
    )
    assert second.resume_index == 1
    assert client.get_run(run_id).info.status == "RUNNING"  # reopened
    for step in range(5, 10):
        second.log_metrics({"loss": float(step)}, step)
    second.finish()

    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, continued
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(10))
    assert run.data.params["optim.lr"] == "0.0001"  # MLflow params are immutable: the original stays
    assert run.data.params["resume.1.optim.lr"] == "0.0002"  # the changed value is kept beside it
    assert run.data.params["new"] == "1"
    assert run.data.tags["biomedgpt.resume.1.changed_params"] == "optim.lr"
    assert run.data.tags["biomedgpt.resume_count"] == "1"
    assert run.data.tags["note"] == "requeued"
    paths = {a.path for a in client.list_artifacts(run_id, "config")}
    assert {"config/resolved.json", "config/resume-1"} <= paths


def test_resume_of_unknown_run_id_starts_a_new_run(make_tracker: Any, client: Any) -> None:
    missing = "0" * 32
    tracker = make_tracker(run_id=missing)
    run_id = tracker.start({"a": 1})
    assert run_id is not None and run_id != missing
    tracker.finish()
    assert client.get_run(run_id).data.tags["biomedgpt.resumed_from"] == missing


def test_mlflow_run_id_env_resumes_a_run_created_elsewhere(
    make_tracker: Any, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. created once in the sbatch prologue and exported, so every requeue lands in the same run
    first = make_tracker()
    run_id = first.start({"a": 1})
    first.finish("KILLED")
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    second = make_tracker()
    assert second.start({"a": 1}) == run_id
    second.finish()
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------- statuses


def test_exception_in_context_marks_failed(make_tracker: Any, client: Any) -> None:
    with pytest.raises(ValueError, match="boom"), make_tracker() as tracker:
        run_id = tracker.start({"a": 1})
        tracker.log_metrics({"loss": 1.0}, 0)
        raise ValueError("boom")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "ValueError: boom" in run.data.tags["biomedgpt.error"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0]  # queued metrics still written


def test_context_without_exception_marks_finished(make_tracker: Any, client: Any) -> None:
    with make_tracker() as tracker:
        run_id = tracker.start({"a": 1})
    assert client.get_run(run_id).info.status == "FINISHED"


def test_finish_killed_is_final_and_idempotent(make_tracker: Any, client: Any) -> None:
    tracker = make_tracker()
    run_id = tracker.start({"a": 1})
    tracker.finish("KILLED")
    tracker.finish("FINISHED")  # second call: no effect
    tracker.log_metrics({"loss": 1.0}, 1)  # after finish: no-op, no error
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "loss" not in run.data.metrics


def test_full_queue_drops_oldest_without_blocking(make_tracker: Any, client: Any) -> None:
    tracker = make_tracker(max_queue=5, batch_interval_s=60.0)  # the writer sleeps: the queue fills
    run_id = tracker.start({"a": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.dropped_steps == 15
    assert len(_tracking_warnings(caught)) == 1
    tracker.finish()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(15, 20))
    assert client.get_run(run_id).data.tags["biomedgpt.dropped_metric_steps"] == "15"


@pytest.mark.slow
def test_system_metrics_logged_and_stopped_on_finish(make_tracker: Any, client: Any) -> None:
    tracker = make_tracker(system_metrics=True, system_metrics_interval_s=0.3)
    run_id = tracker.start({"a": 1})
    assert _wait_for(lambda: any(k.startswith("system/") for k in client.get_run(run_id).data.metrics), timeout_s=15), (
        "no system metrics logged"
    )
    t0 = time.perf_counter()
    tracker.finish()
    assert time.perf_counter() - t0 < 5
    assert not any(t.name == "SystemMetricsMonitor" and t.is_alive() for t in threading.enumerate())
    assert "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics


# ---------------------------------------------------------------------------------------------- process death

_CHILD = textwrap.dedent(
    """
    import sys, time
    from biomedgpt.tracking import MLflowTracker

    uri, experiment, mode = sys.argv[1:4]
    tracker = MLflowTracker(tracking_uri=uri, experiment_name=experiment, enabled=True, system_metrics=False,
                            watchdog=(mode == "sleep"), watchdog_poll_s=0.5)
    run_id = tracker.start({"mode": mode})
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.flush()
    print(run_id, tracker.watchdog_pid, flush=True)
    if mode == "crash":
        raise RuntimeError("crashed outside any context manager")
    time.sleep(300)
    """
)


@pytest.mark.slow
def test_sigkill_is_marked_killed_by_watchdog(
    mlflow_uri: str, client: Any, experiment_name: str, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    with open(tmp_path / "child.err", "w") as err:  # not a pipe: the watchdog inherits it and outlives the child
        proc = subprocess.Popen(
            [sys.executable, str(script), mlflow_uri, experiment_name, "sleep"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_child_env(),
        )
        try:
            run_id, watchdog_pid = _read_line(proc, 60).split()
            assert client.get_run(run_id).info.status == "RUNNING"
            # scancel signals every process of the step: the watchdog must outlive the trainer's shutdown.
            os.kill(int(watchdog_pid), signal.SIGTERM)
            time.sleep(0.3)
            assert psutil.pid_exists(int(watchdog_pid))
            assert psutil.Process(int(watchdog_pid)).status() != psutil.STATUS_ZOMBIE
            os.kill(proc.pid, signal.SIGKILL)  # what the OOM killer or SLURM's final kill does
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
    assert _wait_for(lambda: client.get_run(run_id).info.status == "KILLED", timeout_s=45), (
        client.get_run(run_id).info.status,
        (tmp_path / "child.err").read_text()[-2000:],
    )
    run = client.get_run(run_id)
    assert run.data.tags["biomedgpt.terminated_by"] == "watchdog"
    assert run.info.end_time is not None
    assert _wait_for(lambda: not psutil.pid_exists(int(watchdog_pid)), timeout_s=20), "watchdog did not exit"


@pytest.mark.slow
def test_uncaught_exception_without_context_marks_failed(
    mlflow_uri: str, client: Any, experiment_name: str, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    res = subprocess.run(
        [sys.executable, str(script), mlflow_uri, experiment_name, "crash"],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=60,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    run_id = res.stdout.split()[0]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"  # set by the atexit hook
    assert "crashed outside any context manager" in run.data.tags["biomedgpt.error"]


# ---------------------------------------------------------------------------------------------- degraded modes


def test_unreachable_server_warns_once_and_never_blocks(free_port: int, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port}"  # nothing listens there
    tracker = MLflowTracker(tracking_uri=uri, experiment_name="x", enabled=True, connect_timeout_s=2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        assert tracker.start({"a": 1}, artifacts={"c.json": {"a": 1}}) is None
        assert time.perf_counter() - t0 < 3
        t0 = time.perf_counter()
        for step in range(100):
            tracker.log_metrics({"loss": 1.0, "lr": 1e-4}, step)
        tracker.set_tags({"x": "y"})
        assert tracker.flush(timeout_s=5)
        assert time.perf_counter() - t0 < 1.0
        t0 = time.perf_counter()
        tracker.finish("FINISHED")
        assert time.perf_counter() - t0 < 1.0
    messages = _tracking_warnings(caught)
    assert len(messages) == 1, messages
    assert uri in messages[0] and "unreachable" in messages[0] and "training continues" in messages[0]
    assert not tracker.active and tracker.run_id is None


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_error(404)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


def test_server_that_is_not_mlflow_warns_once(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        tracker = MLflowTracker(tracking_uri=uri, experiment_name="x", enabled=True, start_timeout_s=20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            assert tracker.start({"a": 1}) is None
            assert time.perf_counter() - t0 < 20
            tracker.log_metrics({"loss": 1.0}, 0)
            tracker.finish()
        messages = _tracking_warnings(caught)
        assert len(messages) == 1 and uri in messages[0], messages
    finally:
        server.shutdown()
        server.server_close()


def test_disabled_tracker_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "3")
    for tracker in (MLflowTracker(), MLflowTracker(enabled=False, tracking_uri=f"sqlite:///{tmp_path}/x.db")):
        assert not tracker.enabled
        with warnings.catch_warnings(record=True) as caught, tracker:
            warnings.simplefilter("always")
            assert tracker.start({"a": 1}, artifacts={"c.json": {"a": 1}}) is None
            tracker.log_metrics({"loss": 1.0}, 0)
            tracker.set_tags({"a": "b"})
            tracker.log_artifacts({"d.json": {"b": 2}})
            assert tracker.flush()
            tracker.finish("FAILED")
        assert _tracking_warnings(caught) == []
        assert tracker.run_id is None and tracker.watchdog_pid is None
    assert list(tmp_path.iterdir()) == []  # no mlruns.db, no mlruns/


def test_disabled_tracker_never_imports_mlflow() -> None:
    code = (
        "import sys; from biomedgpt.tracking import MLflowTracker, collect_run_params\n"
        "t = MLflowTracker(enabled=False); t.start(collect_run_params({'a': 1}, None, 2)); t.log_metrics({'x': 1}, 0)\n"
        "t.finish(); assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
