"""Compare MLflow runs: resolve them, diff their params, summarise and plot their metrics, check curves are equal.

The library behind ``biomedgpt-compare`` (:mod:`biomedgpt.cli.compare`)::

    client = open_client(uri)
    runs = [run_data(client, r) for r in resolve_runs(client, ["baseline", "3f2a...", ...])]
    load_histories(client, runs, ["loss", "lr"])
    comparison = build_comparison(runs, ["loss", "lr"])
    render(comparison, Console())
    check = compare_curves(runs, ["loss"], rtol=1e-6)
    save_figure(plot_metrics(runs, ["loss"]), "loss.png")

Curves are ``{step: value}``. When a step was logged more than once (a resumed run repeats the steps after its last
checkpoint), the value logged last wins, which is the one the resumed run continued from.

A summary written with :func:`write_json` keeps the curves it compared, so it can stand in for a run later
(:func:`load_baseline`): record a baseline once, then check new runs against it in CI without the old store.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import fnmatch
import html
import io
import json
import math
import os
import re
import time
import urllib.parse
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from biomedgpt.tracking.uris import sqlite_database

if TYPE_CHECKING:  # heavy imports stay lazy so ``biomedgpt-compare --help`` is instant
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from rich.console import Console

__all__ = [
    "DEFAULT_ASSERT_METRICS",
    "GOAL_RULES",
    "JSON_FORMAT",
    "TRACKING_SCHEMES",
    "CompareError",
    "CompareWarning",
    "Comparison",
    "CurveCheck",
    "CurveDifference",
    "Goal",
    "MetricSummary",
    "ParamRow",
    "RunData",
    "assign_labels",
    "build_comparison",
    "common_metrics",
    "compare_curves",
    "comparison_to_dict",
    "diff_params",
    "expand_metrics",
    "load_baseline",
    "load_histories",
    "metric_curve",
    "metric_goal",
    "open_client",
    "plot_metrics",
    "render",
    "resolve_runs",
    "run_data",
    "save_figure",
    "summarise_curve",
    "values_close",
    "write_html",
    "write_json",
]

Goal = Literal["min", "max", "none"]

# How "best" is chosen, first match wins (regexes on the lower-cased metric name); overridable per call.
# Schedules have no best; throughput and quality scores are maximised; everything else (loss, perplexity,
# grad_norm, step_time, data_wait, memory, ...) is minimised.
GOAL_RULES: tuple[tuple[str, Goal], ...] = (
    (r"(^|[/_.])(lr|learning_rate|epoch|step)$", "none"),
    (
        r"acc|accuracy|score|bleu|rouge|cider|meteor|spice|f1|auc|precision|recall|mfu|hfu|tflops|per_second"
        r"|throughput",
        "max",
    ),
    (r".*", "min"),
)

# Metrics ``--assert-equal`` checks by default: those a deterministic rerun must reproduce (not timings or memory).
DEFAULT_ASSERT_METRICS: tuple[str, ...] = ("loss", "loss_*", "loss/*", "objective", "lr", "grad_norm")

SYSTEM_PREFIX = "system/"  # MLflow system metrics; left out of the default metric selection
JSON_FORMAT = "biomedgpt-compare/1"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_STATUS_STYLE = {"FINISHED": "green", "RUNNING": "cyan", "SCHEDULED": "cyan", "KILLED": "yellow", "FAILED": "red"}


class CompareError(Exception):
    """A run, experiment, store or option that cannot be resolved; the message says which."""


class CompareWarning(UserWarning):
    """Something was chosen for the user (the newest of several same-named runs, a metric nobody logged)."""


# ----------------------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class RunData:
    """One run as the comparison sees it: identity, status, params and the metric curves loaded so far."""

    run_id: str
    name: str
    experiment: str
    status: str
    start_time: int | None  # ms since the epoch, as MLflow stores it
    end_time: int | None
    params: dict[str, str]
    tags: dict[str, str]
    metric_keys: list[str]  # every metric the run logged
    histories: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    source: str = ""  # tracking URI, or the baseline file it came from
    baseline: bool = False
    label: str = ""  # display name, unique among the compared runs (see :func:`assign_labels`)

    @property
    def duration_s(self) -> float | None:
        """Wall time from start to end (to now while the run is still RUNNING)."""
        if self.start_time is None:
            return None
        end = self.end_time if self.end_time else (time.time() * 1000 if self.status == "RUNNING" else None)
        return None if end is None else max(0.0, (end - self.start_time) / 1000)


# Tracking URI schemes MLflow 3 has stores for (mlflow/tracking/_tracking_service/utils.py); plugins add their own
# through the "mlflow.tracking_store" entry point group.
TRACKING_SCHEMES: tuple[str, ...] = (
    "sqlite",
    "http",
    "https",
    "file",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)
_MLFLOW_TABLES = ("experiments", "runs", "metrics")  # what every MLflow SQL schema has


def _innermost(exc: BaseException) -> BaseException:
    """The root cause of a chained exception (MLflow wraps requests, which wraps urllib3, which wraps the OSError)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_http_server(uri: str, shown: str, timeout_s: float) -> None:
    """One request to the MLflow REST API, no retries: fails in ``timeout_s`` where MLflow's client, with its
    default 7 retries and 120 s timeout, takes minutes to give up on a server that is down."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    endpoint = "/api/2.0/mlflow/experiments/search"  # a read (REST API reference: "Search Experiments")
    try:
        response = http_request(
            get_default_host_creds(uri),
            endpoint,
            "POST",
            max_retries=0,
            timeout=timeout_s,
            raise_on_status=False,
            json={"max_results": 1},
        )
    except MlflowException as exc:
        reason = _one_line(str(_innermost(exc)))
        raise CompareError(
            f"cannot reach the MLflow server at {shown} within {timeout_s:g} s ({reason}); is `mlflow server` "
            "running there? Pass --tracking-uri or set MLFLOW_TRACKING_URI to the right server"
        ) from exc
    status = response.status_code
    if status in (401, 403):
        raise CompareError(
            f"the MLflow server at {shown} refused access (HTTP {status}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        )
    if status == 404:
        raise CompareError(
            f"{shown} is not an MLflow tracking server (HTTP 404 for {endpoint}); check the host, port and any "
            "path prefix of the URI"
        )
    if status >= 400:
        raise CompareError(
            f"the MLflow server at {shown} answered HTTP {status} {response.reason} for {endpoint}: "
            f"{_one_line(response.text, 200)}"
        )


def _check_sqlite_store(path: Path, shown: str) -> None:
    """The file must exist and hold MLflow's tables: MLflow would otherwise create a store (or add its tables to
    someone else's database) where the user meant to read one."""
    import sqlite3

    hint = "pass --tracking-uri or set MLFLOW_TRACKING_URI, or run from the directory that holds mlruns.db"
    if not path.parent.is_dir():
        raise CompareError(f"no MLflow store at {shown}: the directory {path.parent} does not exist ({hint})")
    if not path.exists():
        raise CompareError(f"no MLflow store at {shown}: {path} does not exist ({hint})")
    if not path.is_file():
        raise CompareError(f"no MLflow store at {shown}: {path} is not a file ({hint})")
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
    except OSError as exc:
        raise CompareError(f"cannot read the MLflow store {shown}: {exc}") from exc
    if header != b"SQLite format 3\x00":  # the file format's magic string (sqlite.org/fileformat.html)
        raise CompareError(f"no MLflow store at {shown}: {path} is not an SQLite database ({hint})")
    try:  # read-only: the check itself must not change the file
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise CompareError(f"cannot read the SQLite database of {shown}: {exc}") from exc
    missing = [t for t in _MLFLOW_TABLES if t not in tables]
    if missing:
        raise CompareError(
            f"no MLflow store at {shown}: {path} is an SQLite database without MLflow's tables "
            f"(no {', '.join(missing)} table); {hint}"
        )


def _check_file_store(uri: str, shown: str) -> None:
    import urllib.request

    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(uri).path) if uri.startswith("file:") else uri)
    if not path.is_dir():
        raise CompareError(f"no MLflow file store at {shown}: the directory {path} does not exist")
    if not any(child.is_dir() and (child / "meta.yaml").is_file() for child in path.iterdir()):
        raise CompareError(
            f"no MLflow file store at {shown}: {path} has no experiment folder with a meta.yaml; pass the mlruns "
            "directory or an sqlite:/// URI"
        )


def _plugin_schemes() -> list[str]:
    from importlib.metadata import entry_points

    return [entry.name for entry in entry_points(group="mlflow.tracking_store")]


def open_client(tracking_uri: str, *, timeout_s: float = 5.0) -> MlflowClient:
    """An ``MlflowClient`` for a store that exists and answers, checked first so a bad URI fails in seconds with
    a :class:`CompareError` naming it: an http(s) server must answer one REST request within ``timeout_s``; an
    SQLite file or a file store directory must exist and be an MLflow store (nothing is created); an unknown
    scheme lists the supported ones. Other schemes (postgresql, databricks, plugins) go straight to MLflow."""
    from mlflow import MlflowClient

    from biomedgpt.tracking.mlflow_tracker import _redact

    shown = _redact(tracking_uri)
    scheme = urllib.parse.urlsplit(tracking_uri).scheme.lower()
    base = scheme.split("+", 1)[0]  # SQLAlchemy's dialect+driver form, e.g. sqlite+pysqlite
    if base in ("http", "https"):
        _check_http_server(tracking_uri, shown, timeout_s)
    elif base == "sqlite":
        try:
            database = sqlite_database(tracking_uri)
        except ValueError:
            raise CompareError(
                f"bad SQLite URI {shown}: expected sqlite:///relative/path.db or sqlite:////abs/path.db"
            ) from None
        if database is not None:
            _check_sqlite_store(database, shown)
    elif scheme in ("", "file"):
        _check_file_store(tracking_uri, shown)
    elif base not in TRACKING_SCHEMES and scheme not in _plugin_schemes():
        supported = ", ".join(f"{s}:" for s in (*TRACKING_SCHEMES, *_plugin_schemes()))
        raise CompareError(
            f"unsupported tracking URI {shown}: the scheme {scheme}: is none MLflow has a store for ({supported}), "
            "e.g. sqlite:///mlruns.db or http://host:5000"
        )
    return MlflowClient(tracking_uri)


def _experiment_ids(client: MlflowClient, experiments: Sequence[str]) -> list[str]:
    """Ids of the named experiments (names or ids), or of every active experiment when none is named."""
    from mlflow.exceptions import MlflowException

    if not experiments:
        ids: list[str] = []
        token = None
        while True:
            page = client.search_experiments(max_results=1000, page_token=token)
            ids.extend(e.experiment_id for e in page)
            token = page.token
            if not token:
                return ids
    ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None and name.isdigit():
            try:
                exp = client.get_experiment(name)
            except MlflowException:
                exp = None
        if exp is None:
            raise CompareError(f"no experiment named {name!r} in {client.tracking_uri}")
        ids.append(exp.experiment_id)
    return ids


def _search(
    client: MlflowClient, experiment_ids: list[str], filter_string: str, max_results: int, newest_first: bool
) -> list[Run]:
    from mlflow.exceptions import MlflowException

    if not experiment_ids:
        return []
    order = ["attributes.start_time DESC" if newest_first else "attributes.start_time ASC"]
    runs: list[Run] = []
    token = None
    try:
        while len(runs) < max_results:
            page = client.search_runs(
                experiment_ids,
                filter_string,
                max_results=min(1000, max_results - len(runs)),
                order_by=order,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        raise CompareError(f"invalid filter {filter_string!r}: {exc.message}") from exc
    return runs


def _quote(value: str) -> str | None:
    """``value`` as an MLflow filter string literal, or None when it holds both kinds of quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def _runs_named(client: MlflowClient, name: str, experiment_ids: list[str]) -> list[Run]:
    literal = _quote(name)
    if literal is not None:
        return _search(client, experiment_ids, f"attributes.run_name = {literal}", 10_000, newest_first=True)
    everything = _search(client, experiment_ids, "", 100_000, newest_first=True)  # unquotable: filter here
    return [r for r in everything if r.info.run_name == name]


def resolve_runs(
    client: MlflowClient,
    refs: Sequence[str] = (),
    *,
    experiments: Sequence[str] = (),
    filter_string: str | None = None,
    all_matching: bool = False,
    max_results: int = 1000,
) -> list[Run]:
    """The runs named by ``refs`` (run ids, else run names) plus those matching ``filter_string``.

    Names and filters are looked up in ``experiments`` (names or ids; default: every active experiment). With
    ``experiments`` but neither refs nor a filter, every run of those experiments is taken. When several runs share a
    name, the newest is taken with a :class:`CompareWarning`, or all of them with ``all_matching``. Duplicates are
    dropped; the order is that of ``refs``, then the filter's matches oldest first.
    """
    from mlflow.exceptions import MlflowException

    exp_ids = _experiment_ids(client, experiments)
    scope = f"experiment(s) {', '.join(map(repr, experiments))}" if experiments else "any experiment"
    found: dict[str, Run] = {}
    for ref in refs:
        matched: list[Run] = []
        if _RUN_ID.match(ref.lower()):
            try:
                matched = [client.get_run(ref.lower())]
            except MlflowException:
                matched = []
        if not matched:
            named = _runs_named(client, ref, exp_ids)
            if len(named) > 1 and not all_matching:
                newest = named[0]
                warnings.warn(
                    f"{len(named)} runs are named {ref!r}; using the newest, {newest.info.run_id} (started "
                    f"{_format_time(newest.info.start_time)}); pass --all-matching for all of them, or a run id",
                    CompareWarning,
                    stacklevel=2,
                )
                named = named[:1]
            matched = named
        if not matched:
            raise CompareError(f"no run with id or name {ref!r} in {scope} of {client.tracking_uri}")
        for run in matched:
            found.setdefault(run.info.run_id, run)
    if filter_string is not None or (experiments and not refs):
        matched = _search(client, exp_ids, filter_string or "", max_results, newest_first=False)
        if not matched:
            what = f"matches filter {filter_string!r}" if filter_string else "exists"
            raise CompareError(f"no run {what} in {scope} of {client.tracking_uri}")
        for run in matched:
            found.setdefault(run.info.run_id, run)
    if not found:
        raise CompareError("no runs to compare: give run ids or names, --filter or --experiment")
    return list(found.values())


def run_data(client: MlflowClient, run: Run, experiment_names: dict[str, str] | None = None) -> RunData:
    """A :class:`RunData` for an MLflow run, without metric histories (see :func:`load_histories`)."""
    names = experiment_names if experiment_names is not None else {}
    exp_id = run.info.experiment_id
    if exp_id not in names:
        names[exp_id] = client.get_experiment(exp_id).name
    return RunData(
        run_id=run.info.run_id,
        name=run.info.run_name or run.data.tags.get("mlflow.runName", "") or run.info.run_id[:8],
        experiment=names[exp_id],
        status=run.info.status,
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        metric_keys=sorted(run.data.metrics),
        source=client.tracking_uri,
    )


def metric_curve(history: Iterable[Any]) -> dict[int, float]:
    """``{step: value}`` from MLflow ``Metric`` entries, sorted by step; of repeated steps the last logged wins."""
    ordered = sorted(enumerate(history), key=lambda item: (item[1].timestamp, item[0]))
    curve = {int(m.step): float(m.value) for _, m in ordered}
    return dict(sorted(curve.items()))


def load_histories(client: MlflowClient | None, runs: Sequence[RunData], metrics: Iterable[str]) -> None:
    """Fetch the curves of ``metrics`` that each run logged and has not loaded yet (baselines already have theirs)."""
    wanted = list(dict.fromkeys(metrics))
    for run in runs:
        if run.baseline or client is None:
            continue
        for key in wanted:
            if key in run.metric_keys and key not in run.histories:
                run.histories[key] = metric_curve(client.get_metric_history(run.run_id, key))


def assign_labels(runs: Sequence[RunData]) -> None:
    """Set each run's ``label``: its name, plus a short id where names repeat, plus ``[baseline]`` for baselines."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        label = run.name if counts[run.name] == 1 else f"{run.name} ({run.run_id[:8]})"
        run.label = label + (" [baseline]" if run.baseline else "")


# ----------------------------------------------------------------------------------------------------------------
# Metric selection and goals


def _metric_order(name: str) -> tuple[int, str]:
    """loss first, then its parts, then the rest alphabetically; system metrics last."""
    rank = 0 if name == "loss" else 1 if name.startswith("loss") else 3 if name.startswith(SYSTEM_PREFIX) else 2
    return rank, name


def common_metrics(runs: Sequence[RunData], include_system: bool = False) -> list[str]:
    """Metrics every run logged (MLflow system metrics only with ``include_system``)."""
    if not runs:
        return []
    keys = set(runs[0].metric_keys).intersection(*(r.metric_keys for r in runs[1:]))
    if not include_system:
        keys = {k for k in keys if not k.startswith(SYSTEM_PREFIX)}
    return sorted(keys, key=_metric_order)


def expand_metrics(runs: Sequence[RunData], patterns: Sequence[str]) -> list[str]:
    """Names and globs (``loss/*``) to the metrics any run logged, in the order given; unknown names warn."""
    logged = sorted({k for r in runs for k in r.metric_keys}, key=_metric_order)
    chosen: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = [k for k in logged if fnmatch.fnmatchcase(k, pattern)]
        else:
            matches = [pattern] if pattern in logged else []
        if not matches:
            warnings.warn(f"no compared run logged a metric matching {pattern!r}", CompareWarning, stacklevel=2)
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def metric_goal(name: str, overrides: Sequence[tuple[str, Goal]] = ()) -> Goal:
    """Whether the best value of ``name`` is its min, max or undefined: the first override glob that matches,
    else the first of :data:`GOAL_RULES`."""
    for pattern, goal in overrides:
        if fnmatch.fnmatchcase(name, pattern):
            return goal
    lowered = name.lower()
    for regex, goal in GOAL_RULES:
        if re.search(regex, lowered):
            return goal
    return "min"


# ----------------------------------------------------------------------------------------------------------------
# Params and summaries


@dataclasses.dataclass
class ParamRow:
    """One param across the runs (None where a run did not log it)."""

    key: str
    values: list[str | None]

    @property
    def differs(self) -> bool:
        return len(set(self.values)) > 1


def diff_params(
    runs: Sequence[RunData], all_params: bool = False, ignore: Sequence[str] = ()
) -> tuple[list[ParamRow], int]:
    """Rows for the params that differ between the runs (every param with ``all_params``), and how many params
    there are in all. ``ignore`` globs drop keys (``config.tracking.*``)."""
    keys = sorted({k for r in runs for k in r.params if not any(fnmatch.fnmatchcase(k, g) for g in ignore)})
    rows = [ParamRow(k, [r.params.get(k) for r in runs]) for k in keys]
    return (rows if all_params else [row for row in rows if row.differs]), len(keys)


@dataclasses.dataclass
class MetricSummary:
    """Final and best value of one curve. ``best`` is None when the goal is ``none`` or every value is NaN."""

    goal: Goal
    num_steps: int
    final: float
    final_step: int
    best: float | None
    best_step: int | None


def summarise_curve(curve: Mapping[int, float], goal: Goal) -> MetricSummary | None:
    """Final (value at the last step) and best (first step reaching the min or max, NaNs skipped) of a curve."""
    if not curve:
        return None
    final_step = max(curve)
    best: float | None = None
    best_step: int | None = None
    if goal != "none":
        for step in sorted(curve):
            value = curve[step]
            if math.isnan(value):
                continue
            if best is None or (value < best if goal == "min" else value > best):
                best, best_step = value, step
    return MetricSummary(goal, len(curve), curve[final_step], final_step, best, best_step)


@dataclasses.dataclass
class Comparison:
    """What the table, the HTML page and the JSON summary show."""

    runs: list[RunData]
    param_rows: list[ParamRow]
    num_params: int
    all_params: bool
    metrics: list[str]
    summaries: dict[str, list[MetricSummary | None]]  # metric -> one entry per run
    not_common: list[str]  # metrics some but not all runs logged (left out of the default selection)


def build_comparison(
    runs: Sequence[RunData],
    metrics: Sequence[str],
    *,
    all_params: bool = False,
    ignore_params: Sequence[str] = (),
    goals: Sequence[tuple[str, Goal]] = (),
) -> Comparison:
    """Diff the params and summarise ``metrics`` (whose curves must be loaded) of ``runs``."""
    runs = list(runs)
    if not all(r.label for r in runs):
        assign_labels(runs)
    rows, num_params = diff_params(runs, all_params, ignore_params)
    summaries = {m: [summarise_curve(r.histories.get(m, {}), metric_goal(m, goals)) for r in runs] for m in metrics}
    common = set(common_metrics(runs))
    logged = {k for r in runs for k in r.metric_keys if not k.startswith(SYSTEM_PREFIX)}
    not_common = sorted(logged - common, key=_metric_order)
    return Comparison(runs, rows, num_params, all_params, list(metrics), summaries, not_common)


# ----------------------------------------------------------------------------------------------------------------
# Curve equality


def values_close(a: float, b: float, rtol: float, atol: float) -> bool:
    """``|a - b| <= max(rtol * max(|a|, |b|), atol)`` (symmetric, as ``math.isclose``); NaN equals NaN, and an
    infinity only itself."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    if math.isinf(a) or math.isinf(b):
        return False
    return abs(a - b) <= max(rtol * max(abs(a), abs(b)), atol)


def _steps_text(steps: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return shown + (f", ... ({len(steps)} steps)" if len(steps) > limit else "")


@dataclasses.dataclass
class CurveDifference:
    """Why two runs' curves of one metric are not equal."""

    metric: str
    run_a: str  # labels
    run_b: str
    kind: Literal["value", "missing_steps", "missing_metric"]
    step: int | None = None  # first differing step
    value_a: float | None = None
    value_b: float | None = None
    num_differing: int = 0
    num_compared: int = 0
    only_a: list[int] = dataclasses.field(default_factory=list)  # steps only run_a logged
    only_b: list[int] = dataclasses.field(default_factory=list)
    missing_in: list[str] = dataclasses.field(default_factory=list)  # labels of runs without the metric

    def message(self) -> str:
        pair = f"{self.metric}: {self.run_a} vs {self.run_b}"
        if self.kind == "missing_metric":
            return f"{pair}: not logged by {' and '.join(self.missing_in)}"
        if self.kind == "missing_steps":
            return f"{pair}: different steps; " + _missing_steps_text(self.run_a, self.only_a, self.run_b, self.only_b)
        assert self.value_a is not None and self.value_b is not None
        return (
            f"{pair}: first differs at step {self.step}: {self.value_a!r} vs {self.value_b!r} "
            f"(|diff| {abs(self.value_a - self.value_b):.3g}); {self.num_differing} of {self.num_compared} steps differ"
        )


def _missing_steps_text(a: str, only_a: Sequence[int], b: str, only_b: Sequence[int]) -> str:
    parts = []
    if only_a:
        parts.append(f"steps only in {a}: {_steps_text(only_a)}")
    if only_b:
        parts.append(f"steps only in {b}: {_steps_text(only_b)}")
    return "; ".join(parts)


@dataclasses.dataclass
class CurveCheck:
    """Result of :func:`compare_curves`."""

    rtol: float
    atol: float
    metrics: list[str]
    num_runs: int
    num_compared: int  # (pair, metric, step) values compared
    differences: list[CurveDifference]
    notes: list[str] = dataclasses.field(default_factory=list)  # steps skipped under allow_missing_steps

    @property
    def equal(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        tol = f"rtol={self.rtol:g} atol={self.atol:g}"
        if self.equal:
            lines = [
                f"equal within rtol: {', '.join(self.metrics)} of {self.num_runs} runs, "
                f"{self.num_compared} values compared ({tol})"
            ]
        else:
            lines = [f"curves differ ({tol}):"] + [f"  {d.message()}" for d in self.differences]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def compare_curves(
    runs: Sequence[RunData],
    metrics: Sequence[str],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    allow_missing_steps: bool = False,
) -> CurveCheck:
    """Compare the curves of ``metrics`` of every pair of runs, step by step.

    A pair differs when a run lacks the metric, when the step sets differ, or at the first step whose values are not
    :func:`values_close`. With ``allow_missing_steps`` only the common steps are compared (the others become notes),
    but a pair with no common step still differs.
    """
    runs = list(runs)
    if not all(r.label for r in runs):
        assign_labels(runs)
    if len(runs) < 2:
        raise CompareError("--assert-equal needs at least two runs")
    if not metrics:
        raise CompareError("--assert-equal has no metric to compare (choose some with --metrics)")
    differences: list[CurveDifference] = []
    notes: list[str] = []
    compared = 0
    for metric in metrics:
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                ca, cb = a.histories.get(metric), b.histories.get(metric)
                if not ca or not cb:
                    missing = [r.label for r, c in ((a, ca), (b, cb)) if not c]
                    differences.append(CurveDifference(metric, a.label, b.label, "missing_metric", missing_in=missing))
                    continue
                only_a = sorted(set(ca) - set(cb))
                only_b = sorted(set(cb) - set(ca))
                common = sorted(set(ca) & set(cb))
                if only_a or only_b:
                    if not allow_missing_steps or not common:
                        differences.append(
                            CurveDifference(metric, a.label, b.label, "missing_steps", only_a=only_a, only_b=only_b)
                        )
                        continue
                    notes.append(
                        f"{metric}: {a.label} vs {b.label}: " + _missing_steps_text(a.label, only_a, b.label, only_b)
                    )
                bad = [s for s in common if not values_close(ca[s], cb[s], rtol, atol)]
                compared += len(common)
                if bad:
                    s = bad[0]
                    differences.append(
                        CurveDifference(
                            metric,
                            a.label,
                            b.label,
                            "value",
                            step=s,
                            value_a=ca[s],
                            value_b=cb[s],
                            num_differing=len(bad),
                            num_compared=len(common),
                        )
                    )
    return CurveCheck(rtol, atol, list(metrics), len(runs), compared, differences, notes)


# ----------------------------------------------------------------------------------------------------------------
# Formatting and rendering


def _format_time(ms: int | None) -> str:
    return "-" if not ms else _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _best_run(summaries: Sequence[MetricSummary | None]) -> int | None:
    """Index of the run with the strictly best ``best`` value (None for a tie, no goal or a single run)."""
    scored = [(s.best, s.goal, i) for i, s in enumerate(summaries) if s is not None and s.best is not None]
    if len(summaries) < 2 or not scored:
        return None
    best = (min if scored[0][1] == "min" else max)(value for value, _, _ in scored)
    winners = [i for value, _, i in scored if value == best]
    return winners[0] if len(winners) == 1 else None  # a tie has no winner


def _has_tag(runs: Sequence[RunData], tag: str) -> bool:
    return any(r.tags.get(tag) for r in runs)


def render(comparison: Comparison, console: Console) -> None:
    """Print the runs, the differing params and the metric summaries as rich tables."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    runs = comparison.runs  # every string from the store goes in as Text or escaped: "[x]" is not markup here
    table = Table(title="Runs", title_justify="left")
    for column in ("run", "run id", "experiment", "status", "started", "duration"):
        table.add_column(column, overflow="fold")
    extra_tags = [t for t in ("recipe", "size", "task") if _has_tag(runs, t)]
    for tag in extra_tags:
        table.add_column(tag)
    for run in runs:
        status = Text(run.status, style=_STATUS_STYLE.get(run.status, ""))
        row = [Text(run.label), run.run_id, Text(run.experiment), status, _format_time(run.start_time)]
        row.append(_format_duration(run.duration_s) + (" (running)" if run.status == "RUNNING" else ""))
        row.extend(Text(run.tags.get(t, "")) for t in extra_tags)
        table.add_row(*row)
    console.print(table)

    if comparison.param_rows:
        title = (
            f"All params ({comparison.num_params})"
            if comparison.all_params
            else f"Params that differ ({len(comparison.param_rows)} of {comparison.num_params})"
        )
        table = Table(title=title, title_justify="left")
        table.add_column("param", overflow="fold")
        for run in runs:
            table.add_column(escape(run.label), overflow="fold")
        for row in comparison.param_rows:
            cells = [Text("—", style="dim") if v is None else Text(_clip(v)) for v in row.values]
            table.add_row(Text(row.key, style="bold" if row.differs else ""), *cells)
        console.print(table)
    elif len(runs) > 1:
        console.print(f"All {comparison.num_params} params are equal.")

    if comparison.metrics:
        table = Table(title="Metrics: final @ step / best @ step", title_justify="left")
        table.add_column("metric", overflow="fold")
        table.add_column("best is")
        for run in runs:
            table.add_column(escape(run.label), overflow="fold")
        for metric in comparison.metrics:
            summaries = comparison.summaries[metric]
            winner = _best_run(summaries)
            goal = next((s.goal for s in summaries if s is not None), metric_goal(metric))
            cells: list[Text | str] = []
            for i, s in enumerate(summaries):
                if s is None:
                    cells.append(Text("—", style="dim"))
                    continue
                text = f"{_fmt(s.final)} @ {s.final_step}"
                if s.best is not None:
                    text += f"\n{_fmt(s.best)} @ {s.best_step}"
                cells.append(Text(text, style="bold green" if i == winner else ""))
            table.add_row(Text(metric), "-" if goal == "none" else goal, *cells)
        console.print(table)
    if comparison.not_common:
        console.print(Text(f"Logged by some runs only: {', '.join(comparison.not_common)}", style="dim"))


# ----------------------------------------------------------------------------------------------------------------
# Plot


def plot_metrics(runs: Sequence[RunData], metrics: Sequence[str], *, log_y: bool = False) -> Figure:
    """One subplot per metric, every run's curve against step; each titled, with axis labels and a legend of the
    run labels (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = list(runs)
    if not all(r.label for r in runs):
        assign_labels(runs)
    if not metrics:
        raise CompareError("nothing to plot: no chosen metric was logged (choose with --plot-metrics)")
    ncols = 1 if len(metrics) == 1 else 2 if len(metrics) <= 4 else 3
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        plotted = False
        for run in runs:
            label = run.label.replace("$", r"\$")  # no mathtext; a leading "_" would hide the entry
            label = " " + label if label.startswith("_") else label
            curve = run.histories.get(metric)
            if not curve:  # an empty entry, so each legend lists every run and says which lack the metric
                ax.plot([], [], linestyle="none", label=f"{label} (not logged)")
                continue
            steps, values = zip(*curve.items())
            ax.plot(steps, values, label=label, linewidth=1.2, marker="." if len(steps) <= 50 else None)
            plotted = True
        log = plotted and log_y and all(v > 0 for r in runs for v in r.histories.get(metric, {}).values())
        ax.set_title(metric + (" (log scale)" if log else ""))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if not plotted:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif log:
            ax.set_yscale("log")
        ax.legend(fontsize="small")  # on every panel: each may hold a different subset of the runs
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> None:
    """Write the figure (format from the suffix: .png, .svg, .pdf)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)


def _png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# HTML and JSON


def write_html(
    path: str | os.PathLike[str], comparison: Comparison, fig: Figure | None = None, check: CurveCheck | None = None
) -> None:
    """A self-contained page: the tables, the figure as an inline PNG and the curve check, if any."""
    esc = html.escape
    runs = comparison.runs
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>biomedgpt-compare</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:0 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top;text-align:left;font-size:13px}"
        "th{background:#f3f3f3}.dim{color:#999}.best{font-weight:bold;color:#070}.FAILED{color:#c00}"
        ".KILLED{color:#b80}.FINISHED{color:#070}pre{background:#f6f6f6;padding:8px}",
        "</style></head><body><h1>Run comparison</h1><h2>Runs</h2><table><tr>",
        "".join(f"<th>{c}</th>" for c in ("run", "run id", "experiment", "status", "started", "duration")),
        "</tr>",
    ]
    for r in runs:
        parts.append(
            f"<tr><td>{esc(r.label)}</td><td>{esc(r.run_id)}</td><td>{esc(r.experiment)}</td>"
            f"<td class='{esc(r.status)}'>{esc(r.status)}</td><td>{_format_time(r.start_time)}</td>"
            f"<td>{_format_duration(r.duration_s)}</td></tr>"
        )
    parts.append("</table>")
    header = "<tr><th>{}</th>" + "".join(f"<th>{esc(r.label)}</th>" for r in runs) + "</tr>"
    if comparison.param_rows:
        title = "All params" if comparison.all_params else "Params that differ"
        parts.append(f"<h2>{title} ({len(comparison.param_rows)} of {comparison.num_params})</h2><table>")
        parts.append(header.format("param"))
        for row in comparison.param_rows:
            cells = "".join("<td class='dim'>—</td>" if v is None else f"<td>{esc(v)}</td>" for v in row.values)
            parts.append(f"<tr><td>{esc(row.key)}</td>{cells}</tr>")
        parts.append("</table>")
    if comparison.metrics:
        parts.append("<h2>Metrics: final @ step / best @ step</h2><table>")
        parts.append(header.format("metric"))
        for metric in comparison.metrics:
            summaries = comparison.summaries[metric]
            winner = _best_run(summaries)
            cells = []
            for i, s in enumerate(summaries):
                if s is None:
                    cells.append("<td class='dim'>—</td>")
                    continue
                best = f"<br>{_fmt(s.best)} @ {s.best_step}" if s.best is not None else ""
                cls = " class='best'" if i == winner else ""
                cells.append(f"<td{cls}>{_fmt(s.final)} @ {s.final_step}{best}</td>")
            parts.append(f"<tr><td>{esc(metric)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    if check is not None:
        parts.append(f"<h2>Curve check</h2><pre>{esc(check.summary())}</pre>")
    if fig is not None:
        data = base64.b64encode(_png_bytes(fig)).decode("ascii")
        parts.append(f"<h2>Curves</h2><img alt='metric curves' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(parts), encoding="utf-8")


def _num(value: float | None) -> float | str | None:
    """Non-finite floats as the strings Python's ``float()`` reads back, so the file stays strict JSON."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def comparison_to_dict(
    comparison: Comparison, check: CurveCheck | None = None, history_metrics: Sequence[str] | None = None
) -> dict[str, Any]:
    """The JSON summary: runs (params, tags, metric summaries, curves of ``history_metrics``), differing params,
    and the curve check. Readable back as a baseline by :func:`load_baseline`."""
    keep = comparison.metrics if history_metrics is None else list(history_metrics)
    runs = []
    for i, r in enumerate(comparison.runs):
        summaries = {}
        for metric in comparison.metrics:
            s = comparison.summaries[metric][i]
            if s is not None:
                summaries[metric] = {
                    "goal": s.goal,
                    "final": _num(s.final),
                    "final_step": s.final_step,
                    "best": _num(s.best),
                    "best_step": s.best_step,
                    "num_steps": s.num_steps,
                }
        runs.append(
            {
                "run_id": r.run_id,
                "name": r.name,
                "label": r.label,
                "experiment": r.experiment,
                "status": r.status,
                "start_time": r.start_time,
                "end_time": r.end_time,
                "duration_s": r.duration_s,
                "source": r.source,
                "baseline": r.baseline,
                "params": r.params,
                "tags": r.tags,
                "metric_keys": r.metric_keys,
                "metrics": summaries,
                "history": {m: [[s, _num(v)] for s, v in r.histories[m].items()] for m in keep if m in r.histories},
            }
        )
    out: dict[str, Any] = {
        "format": JSON_FORMAT,
        "runs": runs,
        "differing_params": {row.key: row.values for row in comparison.param_rows if row.differs},
        "metrics": comparison.metrics,
    }
    if check is not None:
        out["assert_equal"] = {
            "equal": check.equal,
            "rtol": check.rtol,
            "atol": check.atol,
            "metrics": check.metrics,
            "values_compared": check.num_compared,
            "differences": [
                {k: _num(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(d).items()}
                for d in check.differences
            ],
        }
    return out


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def load_baseline(path: str | os.PathLike[str]) -> list[RunData]:
    """The runs of a summary written by :func:`write_json`, with their saved curves, marked as baselines."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot read baseline {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
        raise CompareError(f"{path} is not a biomedgpt-compare JSON summary (format {JSON_FORMAT!r})")
    runs = []
    for r in data["runs"]:
        histories = {m: {int(s): float(v) for s, v in points} for m, points in r.get("history", {}).items()}
        runs.append(
            RunData(
                run_id=r["run_id"],
                name=r["name"],
                experiment=r.get("experiment", ""),
                status=r.get("status", ""),
                start_time=r.get("start_time"),
                end_time=r.get("end_time"),
                params=dict(r.get("params", {})),
                tags=dict(r.get("tags", {})),
                metric_keys=sorted(histories),
                histories=histories,
                source=str(path),
                baseline=True,
            )
        )
    if not runs:
        raise CompareError(f"baseline {path} holds no runs")
    return runs
