"""MLflow experiment tracking for the trainer: rank 0 only, and never blocking the training step.

Design (see docs of :class:`MLflowTracker`):

* Only :meth:`MLflowTracker.start` talks to the store from the caller's thread, and only for a bounded time (it
  waits for the run to exist so it can return the run id the trainer stores in its checkpoints). Everything else
  (params, artifacts, metrics, tags, the terminal status) goes through a background thread that batches metrics
  with ``MlflowClient.log_batch``. :meth:`MLflowTracker.log_metrics` appends to a bounded queue and returns; when the
  queue is full the oldest step is dropped and counted.
* The default store is ``sqlite:///<cwd>/mlruns.db``; ``MLFLOW_TRACKING_URI`` or the ``tracking_uri`` argument
  points it elsewhere. An http(s) server that does not accept a TCP connection (or fails the first API calls) turns
  the tracker into a no-op after exactly one warning; training goes on.
* A resumed job passes the run id from its checkpoint: the same run is reopened (status RUNNING again), new params
  are added and changed ones are recorded under ``resume.<n>.<key>`` because MLflow refuses to change a param.
* Terminal status: ``finish()`` (FINISHED / FAILED / KILLED), the context manager (FAILED on an exception), an
  ``atexit`` hook (FAILED when the process exits without finishing), and a watchdog subprocess
  (:mod:`biomedgpt.tracking.watchdog`) that marks the run KILLED when the process dies by SIGKILL, the OOM killer
  or a SLURM kill, which no in-process hook survives.

MLflow is imported lazily: ranks other than 0 never import it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import getpass
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from biomedgpt.tracking.params import (
    MAX_TAG_VALUE_LENGTH,
    flatten_params,
    sanitize_key,
    stringify_value,
)
from biomedgpt.tracking.uris import sqlite_database

__all__ = [
    "DEFAULT_DB_NAME",
    "artifact_location",
    "MLflowTracker",
    "RunStatus",
    "TrackingWarning",
    "default_tracking_uri",
    "process_rank",
]

_log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_TERMINAL = ("FINISHED", "FAILED", "KILLED")

DEFAULT_DB_NAME = "mlruns.db"
SESSION_TAG = "biomedgpt.session"  # owner of a RUNNING run: the watchdog only touches runs of its own session
TERMINATED_BY_TAG = "biomedgpt.terminated_by"
RESUME_COUNT_TAG = "biomedgpt.resume_count"
ERROR_TAG = "biomedgpt.error"
DROPPED_TAG = "biomedgpt.dropped_metric_steps"

# Applied (only where the user has not set them) before MLflow's HTTP client is first used. MLflow's defaults
# (7 retries with exponential backoff, 120 s timeout) make one failed request take minutes; ours fail in seconds.
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
_MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH


class TrackingWarning(UserWarning):
    """Tracking degraded (store unreachable, data dropped); training itself is unaffected."""


def default_tracking_uri(cwd: str | os.PathLike[str] | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store ``mlruns.db`` in ``cwd`` (default: the working dir)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(cwd if cwd is not None else os.getcwd()).resolve() / DEFAULT_DB_NAME}"


def artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to an SQLite database (not in whatever directory a job
    happened to start in), else the store's default (None)."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return None
    return (database.resolve().parent / "mlruns" / sanitize_key(experiment_name).replace("/", "_")).as_uri()


def process_rank() -> int:
    """Global rank from the launcher's environment (``RANK``, then SLURM and Open MPI spellings), default 0."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def _redact(uri: str) -> str:
    """The URI without credentials, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        netloc = "***@" + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def _probe_http(uri: str, timeout_s: float) -> str | None:
    """Why an http(s) tracking server cannot be reached (TCP connect with a short timeout), or None if it can.

    MLflow's client would retry a refused connection for minutes; this tells in at most ``timeout_s``.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"bad URI ({exc})"
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return None  # through a proxy a direct connect proves nothing; MLflow's (shortened) timeouts apply
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc})"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 500 else text[:497] + "..."


def _tag_value(value: Any) -> str:
    return stringify_value(value, limit=MAX_TAG_VALUE_LENGTH)


def _relative_artifact_name(name: str) -> str:
    """A safe relative path for an artifact name (no absolute paths, no ``..``)."""
    parts = [p for p in PurePosixPath(str(name).replace("\\", "/")).parts if p not in ("/", "..", ".")]
    return "/".join(parts) or "artifact"


def _serialize_artifacts(artifacts: Mapping[str, Any]) -> list[tuple[str, bytes | Path]]:
    """Snapshot artifacts now (the caller may mutate its dicts later): dict -> JSON/YAML, str -> text, Path -> file.

    A mapping is written as YAML when its name ends in ``.yaml``/``.yml``, else as JSON (``.json`` appended when the
    name has no suffix).
    """
    out: list[tuple[str, bytes | Path]] = []
    for name, content in artifacts.items():
        rel = _relative_artifact_name(name)
        if isinstance(content, os.PathLike):
            out.append((rel, Path(content)))
            continue
        if isinstance(content, str):
            out.append((rel, content.encode()))
            continue
        if dataclasses.is_dataclass(content) and not isinstance(content, type):
            content = dataclasses.asdict(content)
        plain = json.loads(json.dumps(content, default=str))  # Paths, enums, numpy scalars -> plain data
        if rel.endswith((".yaml", ".yml")):
            import yaml  # PyYAML ships with MLflow

            out.append((rel, yaml.safe_dump(plain, sort_keys=False).encode()))
        else:
            if "." not in PurePosixPath(rel).name:
                rel += ".json"
            out.append((rel, (json.dumps(plain, indent=2) + "\n").encode()))
    return out


# Trackers alive in this process: a forked child (DataLoader worker) must not log or finish the parent's run.
_LIVE_TRACKERS: weakref.WeakSet[MLflowTracker] = weakref.WeakSet()


def _disable_in_forked_child() -> None:
    for tracker in list(_LIVE_TRACKERS):
        tracker._active = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_in_forked_child)


class MLflowTracker:
    """Experiment tracking for one training run, safe to call from the training loop on every rank.

    Args:
        tracking_uri: store or server; None means ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db``.
        experiment_name: MLflow experiment (created when missing).
        run_name: display name of a new run (``mlflow.runName``).
        run_id: resume this run (the trainer keeps it in its checkpoints); None means ``MLFLOW_RUN_ID`` if set
            (a run created in an sbatch prologue), else a new run. A run id the store does not know starts a new
            run tagged ``biomedgpt.resumed_from``.
        tags: run tags (run name, model size, task, ...); updated on resume.
        enabled: False on ranks other than 0: every method is then a cheap no-op and MLflow is never imported.
            None means "rank 0 according to the launcher environment" (:func:`process_rank`).
        system_metrics: log MLflow's CPU/memory/disk/network (and GPU, with ``nvidia-ml-py``) metrics.
        system_metrics_interval_s: sampling interval of the system metrics
            (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it, as in MLflow).
        watchdog: spawn the watchdog subprocess that marks the run KILLED if this process dies without finishing.
        watchdog_poll_s: how often the watchdog checks its parent besides watching its pipe.
        max_queue: metric steps buffered for the background writer; beyond that the oldest step is dropped.
        batch_interval_s: the writer sends queued metrics at most this often (one ``log_batch`` per 1000 values).
        start_timeout_s: longest :meth:`start` waits for the run to be created or reopened (a fresh SQLite file
            takes several seconds for its schema migrations).
        connect_timeout_s: TCP connect timeout of the reachability probe of an http(s) server.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment_name: str = "biomedgpt",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        watchdog: bool = True,
        watchdog_poll_s: float = 2.0,
        max_queue: int = 10_000,
        batch_interval_s: float = 2.0,
        start_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.enabled = process_rank() == 0 if enabled is None else bool(enabled)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags: dict[str, Any] = dict(tags or {})
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = float(system_metrics_interval_s)
        self.use_watchdog = watchdog
        self.watchdog_poll_s = float(watchdog_poll_s)
        self.max_queue = max(1, int(max_queue))
        self.batch_interval_s = float(batch_interval_s)
        self.start_timeout_s = float(start_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        # Resolved only on rank 0: other ranks must not even look at the environment's store.
        self._tracking_uri = (tracking_uri or default_tracking_uri()) if self.enabled else (tracking_uri or "")
        self._requested_run_id = run_id if run_id is not None else os.environ.get("MLFLOW_RUN_ID") or None

        self._active = False  # the hot-path flag: True between a successful start() and finish()
        self._started = False
        self._finish_requested = False
        self._run_id: str | None = None
        self._resume_index = 0
        self._session = uuid.uuid4().hex
        self._pid = os.getpid()

        self._cv = threading.Condition()
        self._queue: deque[tuple[int, int, list[tuple[str, float]]]] = deque()
        self._ops: deque[tuple[Any, ...]] = deque()
        self._dropped_steps = 0
        self._failures = 0
        self._warned: set[str] = set()
        self._key_cache: dict[str, str] = {}

        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._setup_error: str | None = None
        self._abandoned = False
        self._terminated = False
        self._monitor: Any = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once :meth:`start` succeeded (store it in checkpoints to resume the run)."""
        return self._run_id

    @property
    def active(self) -> bool:
        """True while metrics are being recorded."""
        return self._active

    @property
    def resume_index(self) -> int:
        """0 for a new run, n for the n-th reopening of a run."""
        return self._resume_index

    @property
    def dropped_steps(self) -> int:
        """Metric steps dropped because the background writer fell behind."""
        return self._dropped_steps

    @property
    def watchdog_pid(self) -> int | None:
        return self._watchdog.pid if self._watchdog is not None else None

    # ------------------------------------------------------------------ public API

    def start(
        self,
        params: Mapping[str, Any] | None = None,
        artifacts: Mapping[str, Mapping[str, Any] | str | os.PathLike[str]] | None = None,
    ) -> str | None:
        """Create (or reopen) the run and queue ``params`` and ``artifacts``; return the run id, or None.

        ``params`` may be nested; they are flattened to dotted keys (:func:`flatten_params`). ``artifacts`` map a
        file name under ``config/`` (``config/resume-<n>/`` on a resumed run) to a mapping (written as JSON, or
        YAML for ``.yaml``/``.yml`` names), a text string, or a path of a file to copy. Never raises: on failure
        it warns once and the tracker becomes a no-op.
        """
        if not self.enabled or self._started:
            return self._run_id
        self._started = True
        try:
            flat = flatten_params(params or {})
            files = _serialize_artifacts(artifacts or {})
            uri = self._tracking_uri
            problem = _probe_http(uri, self.connect_timeout_s)
            if problem is not None:
                self._give_up(problem)
                return None
            if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
                for name, value in _HTTP_ENV_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            self._thread = threading.Thread(
                target=self._worker_main, args=(flat, files), name="mlflow-tracker", daemon=True
            )
            self._thread.start()
            ready = self._ready.wait(self.start_timeout_s)
            with self._cv:
                if not ready and not self._ready.is_set():
                    self._abandoned = True  # the worker closes the run if it ever gets there
            if self._abandoned:
                self._give_up(f"no answer within {self.start_timeout_s:g} s")
                return None
            if self._setup_error is not None:
                self._give_up(self._setup_error)
                return None
            self._active = True
            _LIVE_TRACKERS.add(self)
            atexit.register(self._at_exit)
            if self.use_watchdog:
                self._start_watchdog()
            return self._run_id
        except Exception as exc:  # tracking must never take training down
            self._give_up(_describe(exc))
            if self._thread is not None and self._thread.is_alive() and self._ready.is_set():
                self._enqueue(("finish", "FAILED", f"tracker start failed: {_describe(exc)}"))
            return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` for ``step`` and return at once (no I/O on this thread).

        Values are converted with ``float()`` here: pass Python numbers (a CUDA tensor would synchronise the
        device). Non-numeric values are skipped. NaN and inf are kept: a diverging loss is worth seeing.
        """
        if not self._active:
            return
        try:
            items: list[tuple[str, float]] = []
            for key, value in metrics.items():
                try:
                    items.append((key, float(value)))
                except (TypeError, ValueError):
                    continue
            entry = (int(step), time.time_ns() // 1_000_000, items)
            with self._cv:
                full = len(self._queue) >= self.max_queue
                if full:
                    self._queue.popleft()  # drop the oldest: the newest steps show where training is now
                    self._dropped_steps += 1
                self._queue.append(entry)
            if full:
                self._warn_once(
                    "dropped",
                    f"MLflow writer is behind; dropping the oldest queued metric steps (queue size {self.max_queue})",
                )
        except Exception:  # never raise into the training loop
            pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (values stringified and truncated to MLflow's limit)."""
        if not self._active:
            return
        try:
            snapshot = {sanitize_key(k): _tag_value(v) for k, v in tags.items()}
            self._enqueue(("tags", snapshot))
        except Exception:
            pass

    def log_artifacts(
        self, artifacts: Mapping[str, Mapping[str, Any] | str | os.PathLike[str]], artifact_dir: str = "config"
    ) -> None:
        """Queue artifacts (same forms as in :meth:`start`) under ``artifact_dir``; serialised now, written later."""
        if not self._active:
            return
        try:
            self._enqueue(("artifacts", _serialize_artifacts(artifacts), _relative_artifact_name(artifact_dir)))
        except Exception as exc:
            self._warn_once("artifacts", f"MLflow artifacts not logged: {_describe(exc)}")

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False if that took longer than ``timeout_s``."""
        if not self._active:
            return True
        done = threading.Event()
        self._enqueue(("flush", done))
        return done.wait(timeout_s)

    def finish(
        self, status: RunStatus | str = "FINISHED", *, error: str | None = None, timeout_s: float = 30.0
    ) -> None:
        """Write what is queued, stop system metrics and end the run with ``status``; idempotent.

        The trainer calls ``finish("KILLED")`` when it exits on a signal (SIGTERM from SLURM) before training is
        done; a requeued job reopens the run with :meth:`start`. Waits at most ``timeout_s``; if MLflow is slower
        the watchdog applies ``status`` when this process exits.
        """
        if not self._active or self._finish_requested or os.getpid() != self._pid:
            return
        status = str(status).upper()
        if status not in _TERMINAL:
            self._warn_once("status", f"unknown MLflow run status {status!r}; using FAILED")
            status = "FAILED"
        self._finish_requested = True
        self._active = False
        try:
            atexit.unregister(self._at_exit)
            self._tell_watchdog(f"final {status}")
            self._enqueue(("finish", status, error))
            if self._thread is not None:
                self._thread.join(timeout_s)
            if self._thread is not None and self._thread.is_alive():
                self._warn_once(
                    "finish",
                    f"MLflow did not finish run {self._run_id} within {timeout_s:g} s; "
                    "the watchdog will set its status when this process exits",
                )
                return
            if self._terminated:
                self._stop_watchdog()
        except Exception as exc:
            self._warn_once("finish", f"MLflow finish failed: {_describe(exc)}")

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None or (issubclass(exc_type, SystemExit) and getattr(exc, "code", 1) in (0, None)):
            self.finish("FINISHED")  # a clean sys.exit() inside the block is a normal end
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            self.finish(status, error="".join(traceback.format_exception(exc_type, exc, tb)))

    # ------------------------------------------------------------------ caller-side helpers

    def _enqueue(self, op: tuple[Any, ...]) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, TrackingWarning, stacklevel=3)

    def _give_up(self, reason: str) -> None:
        self._active = False
        http = urllib.parse.urlsplit(self._tracking_uri).scheme in ("http", "https")
        where, what = ("server", "unreachable") if http else ("store", "unavailable")
        self._warn_once(
            "unreachable",
            f"MLflow tracking {where} {_redact(self._tracking_uri)} {what}: {reason}; "
            "training continues without tracking",
        )

    def _at_exit(self) -> None:
        # The process is exiting without finish(): an unhandled exception (sys.last_value) or a forgotten call.
        if not self._active or os.getpid() != self._pid:
            return
        last = getattr(sys, "last_value", None)
        if last is not None:
            error = "".join(traceback.format_exception(type(last), last, last.__traceback__))
        else:
            error = "process exited without calling finish()"
        self.finish("FAILED", error=error, timeout_s=10.0)

    def _start_watchdog(self) -> None:
        if self._run_id is None:
            return
        env = dict(os.environ)
        # Importable even from a source checkout that is not installed.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable,
            "-m",
            "biomedgpt.tracking.watchdog",
            "--tracking-uri",
            self._tracking_uri,
            "--run-id",
            self._run_id,
            "--parent-pid",
            str(os.getpid()),
            "--session",
            self._session,
            "--poll",
            str(self.watchdog_poll_s),
        ]
        # SLURM signals every process of a step on scancel; the watchdog must survive to see how the trainer ends.
        # An ignored disposition survives exec, so sh ignores the signals before Python starts (no window in which
        # a SIGTERM kills a half-started watchdog), and the watchdog never installs a handler for them.
        if os.path.exists("/bin/sh"):
            cmd = ["/bin/sh", "-c", "trap '' TERM INT HUP; exec " + " ".join(shlex.quote(c) for c in cmd)]
        try:
            # Own session: a Ctrl-C or signal to the trainer's process group must not reach it.
            self._watchdog = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._warn_once("watchdog", f"MLflow watchdog not started ({exc}); a killed run may stay RUNNING")

    def _tell_watchdog(self, line: str) -> None:
        proc = self._watchdog
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (OSError, ValueError):
            pass  # it is gone already

    def _stop_watchdog(self) -> None:
        proc = self._watchdog
        if proc is None:
            return
        self._tell_watchdog("done")
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        self._watchdog = None

    # ------------------------------------------------------------------ background writer

    def _worker_main(self, params: dict[str, str], files: list[tuple[str, bytes | Path]]) -> None:
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self._tracking_uri)
            existing = self._open_run(client)
        except BaseException as exc:  # reported by start()
            with self._cv:
                self._setup_error = _describe(exc)
                self._ready.set()
            return
        with self._cv:
            self._ready.set()
            abandoned = self._abandoned
        if abandoned:  # start() gave up waiting: do not leave a RUNNING run behind
            self._guarded("closing the run", client.set_terminated, self._run_id, "FAILED")
            return
        self._guarded("logging params", self._write_params, client, params, existing)
        subdir = "config" if self._resume_index == 0 else f"config/resume-{self._resume_index}"
        self._guarded("logging artifacts", self._write_artifacts, client, files, subdir)
        if self.system_metrics:
            self._guarded("starting system metrics", self._start_system_metrics)
        self._loop(client)

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                client.restore_experiment(exp.experiment_id)  # a name stays taken after deletion
            return exp.experiment_id
        location = artifact_location(self._tracking_uri, self.experiment_name)
        try:
            return client.create_experiment(self.experiment_name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(self.experiment_name).experiment_id  # another job won the race

    def _run_tags(self) -> dict[str, str]:
        tags = {sanitize_key(k): _tag_value(v) for k, v in self.tags.items()}
        tags[SESSION_TAG] = self._session
        tags["biomedgpt.hostname"] = socket.gethostname()
        tags["biomedgpt.pid"] = str(os.getpid())
        for env_name, tag in (
            ("SLURM_JOB_ID", "slurm.job_id"),
            ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
            ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id"),
            ("SLURM_RESTART_COUNT", "slurm.restart_count"),
        ):
            if os.environ.get(env_name):
                tags[tag] = os.environ[env_name]
        with contextlib.suppress(Exception):  # no passwd entry in some containers
            tags.setdefault("mlflow.user", getpass.getuser())
        return tags

    def _open_run(self, client: Any) -> dict[str, str]:
        """Create or reopen the run; return the params it already has."""
        from mlflow.exceptions import MlflowException

        tags = self._run_tags()
        run = None
        if self._requested_run_id:
            try:
                run = client.get_run(self._requested_run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
            if run is None:
                tags["biomedgpt.resumed_from"] = self._requested_run_id
        if run is not None:
            self._resume_index = int(run.data.tags.get(RESUME_COUNT_TAG, "0") or 0) + 1
            tags[RESUME_COUNT_TAG] = str(self._resume_index)
            self._run_id = run.info.run_id
            # Claim the run (session tag) before setting RUNNING, so a late watchdog of the previous job sees
            # that the run is no longer its own.
            self._write_tags(client, tags)
            client.update_run(self._run_id, status="RUNNING")
            return dict(run.data.params)
        created = client.create_run(self._experiment_id(client), run_name=self.run_name, tags=tags)
        self._run_id = created.info.run_id
        return {}

    def _write_params(self, client: Any, params: dict[str, str], existing: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        new = {k: v for k, v in params.items() if k not in existing}
        changed = [k for k, v in params.items() if k in existing and existing[k] != v]
        tags: list[RunTag] = []
        if changed:
            # MLflow refuses to change a logged param; keep the new value under a per-resume prefix.
            for k in changed:
                key = sanitize_key(f"resume.{self._resume_index}.{k}")
                if key not in existing:
                    new[key] = params[k]
            tags.append(RunTag(f"biomedgpt.resume.{self._resume_index}.changed_params", _tag_value(",".join(changed))))
        if params.get("git.commit", "unknown") != "unknown":
            tags.append(RunTag("mlflow.source.git.commit", params["git.commit"]))
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            client.log_batch(self._run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
        if tags:
            client.log_batch(self._run_id, tags=tags)

    def _write_artifacts(self, client: Any, files: list[tuple[str, bytes | Path]], subdir: str) -> None:
        if not files:
            return
        with tempfile.TemporaryDirectory(prefix="biomedgpt-mlflow-") as tmp:
            for rel, content in files:
                dest = Path(tmp, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    if content.is_dir():
                        shutil.copytree(content, dest, dirs_exist_ok=True)
                    else:
                        shutil.copyfile(content, dest)
                else:
                    dest.write_bytes(content)
            client.log_artifacts(self._run_id, tmp, artifact_path=subdir)

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self._run_id,
            sampling_interval=self.system_metrics_interval_s,
            samples_before_logging=1,
            resume_logging=self._resume_index > 0,  # continue the system/* step count of the reopened run
            tracking_uri=self._tracking_uri,
        )
        monitor.start()
        self._monitor = monitor

    def _metric_key(self, key: str) -> str:
        cached = self._key_cache.get(key)
        if cached is None:
            cached = self._key_cache[key] = sanitize_key(key)
        return cached

    def _write_metrics(self, client: Any, batch: list[tuple[int, int, list[tuple[str, float]]]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key=self._metric_key(k), value=v, timestamp=ts, step=step)
            for step, ts, items in batch
            for k, v in items
        ]
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            client.log_batch(self._run_id, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])

    def _write_tags(self, client: Any, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            client.log_batch(self._run_id, tags=items[i : i + _MAX_PARAMS_PER_BATCH])

    def _guarded(self, what: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # the writer must survive any store error
            self._failures += 1
            _log.debug("MLflow %s failed", what, exc_info=True)
            self._warn_once(
                "write",
                f"MLflow tracking at {_redact(self._tracking_uri)} failed while {what}: {_describe(exc)}; "
                "training continues, some tracking data may be lost",
            )
            return False

    def _loop(self, client: Any) -> None:
        while True:
            with self._cv:
                if not self._ops:
                    self._cv.wait(timeout=self.batch_interval_s)  # batch steps between wake-ups
                batch = list(self._queue)
                self._queue.clear()
                ops = list(self._ops)
                self._ops.clear()
            if batch:
                self._guarded("logging metrics", self._write_metrics, client, batch)
            for op in ops:
                kind = op[0]
                if kind == "tags":
                    self._guarded("setting tags", self._write_tags, client, op[1])
                elif kind == "artifacts":
                    self._guarded("logging artifacts", self._write_artifacts, client, op[1], op[2])
                elif kind == "flush":
                    op[1].set()
                elif kind == "finish":
                    self._close_run(client, op[1], op[2])
                    return

    def _close_run(self, client: Any, status: str, error: str | None) -> None:
        if self._monitor is not None:
            self._guarded("stopping system metrics", self._monitor.finish)
            self._monitor = None
        tags: dict[str, str] = {}
        if error:
            tags[ERROR_TAG] = error[-MAX_TAG_VALUE_LENGTH:]  # the end of a traceback is the informative part
        if self._dropped_steps:
            tags[DROPPED_TAG] = str(self._dropped_steps)
        if tags:
            self._guarded("setting tags", self._write_tags, client, tags)
        self._terminated = self._guarded("ending the run", client.set_terminated, self._run_id, status)
