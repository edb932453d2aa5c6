"""``biomedgpt-compare`` against a real MLflow SQLite store: run resolution, the params and metrics tables, the plot,
HTML and JSON outputs, baselines, and ``--assert-equal`` exit statuses."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from biomedgpt.cli.compare import main
from biomedgpt.tracking.compare import (
    CompareError,
    CompareWarning,
    RunData,
    compare_curves,
    diff_params,
    load_baseline,
    metric_curve,
    metric_goal,
    plot_metrics,
    resolve_runs,
    summarise_curve,
    values_close,
)

LOSS = [4.0, 3.0, 2.5, 2.0, 2.2]  # best (min) at step 4, final at step 5
PARAMS = {"config.optim.lr": "0.0001", "world_size": "2", "git.commit": "abc123"}


def make_run(
    client: Any,
    experiment_id: str,
    name: str,
    *,
    params: Mapping[str, str] = PARAMS,
    metrics: Mapping[str, Sequence[float] | Mapping[int, float]] | None = None,
    status: str = "FINISHED",
    start_ms: int | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """A run with params, metric histories (lists are steps 1..n), tags and a terminal status; returns its id."""
    from mlflow.entities import Metric, Param

    start = start_ms if start_ms is not None else int(time.time() * 1000)
    run = client.create_run(experiment_id, start_time=start, run_name=name, tags=dict(tags or {}))
    entries = []
    for key, values in (metrics if metrics is not None else {"loss": LOSS}).items():
        points = values.items() if isinstance(values, Mapping) else enumerate(values, start=1)
        entries += [Metric(key, float(v), start + 10 * step, step) for step, v in points]
    client.log_batch(run.info.run_id, metrics=entries, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status, end_time=start + 90_000)
    return run.info.run_id


@pytest.fixture
def experiment_id(client: Any, experiment_name: str) -> str:
    return client.create_experiment(experiment_name)


@pytest.fixture
def cli(mlflow_uri: str, experiment_name: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``biomedgpt-compare`` on the test store and experiment; returns (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--tracking-uri", mlflow_uri, "--experiment", experiment_name])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# ----------------------------------------------------------------------------------------------------------------
# Resolving runs


def test_resolve_by_id_name_filter_and_experiment(client: Any, experiment_id: str, experiment_name: str) -> None:
    a = make_run(client, experiment_id, "res-a", start_ms=1_000_000)
    b = make_run(client, experiment_id, "res-b", params={**PARAMS, "config.optim.lr": "0.0003"}, start_ms=2_000_000)
    c = make_run(client, experiment_id, "res-c", start_ms=3_000_000)

    assert [r.info.run_id for r in resolve_runs(client, [b])] == [b]  # by id, in any experiment
    assert [r.info.run_id for r in resolve_runs(client, ["res-c", "res-a"], experiments=[experiment_name])] == [c, a]
    by_filter = resolve_runs(client, experiments=[experiment_name], filter_string="params.config.optim.lr = '0.0003'")
    assert [r.info.run_id for r in by_filter] == [b]
    # An experiment alone: all its runs, oldest first; refs and a filter are merged without duplicates.
    assert [r.info.run_id for r in resolve_runs(client, experiments=[experiment_name])] == [a, b, c]
    merged = resolve_runs(client, [b], experiments=[experiment_name], filter_string="attributes.run_name LIKE 'res-%'")
    assert [r.info.run_id for r in merged] == [b, a, c]


def test_same_name_takes_newest_with_warning_or_all(client: Any, experiment_id: str, experiment_name: str) -> None:
    old = make_run(client, experiment_id, "twin", start_ms=1_000_000)
    new = make_run(client, experiment_id, "twin", start_ms=5_000_000)
    with pytest.warns(CompareWarning, match=r"2 runs are named 'twin'.*" + new):
        runs = resolve_runs(client, ["twin"], experiments=[experiment_name])
    assert [r.info.run_id for r in runs] == [new]
    runs = resolve_runs(client, ["twin"], experiments=[experiment_name], all_matching=True)
    assert [r.info.run_id for r in runs] == [new, old]


def test_unresolvable_inputs_are_errors_naming_what_matched_nothing(
    client: Any, experiment_id: str, experiment_name: str, cli: Any, tmp_path: Path
) -> None:
    make_run(client, experiment_id, "present")
    code, out, err = cli("present", "nope-run")
    assert code == 2
    assert "no run with id or name 'nope-run'" in err and experiment_name in err

    code, _, err = cli("--filter", "params.config.optim.lr = '42'")
    assert code == 2 and "no run matches filter" in err and "'42'" in err

    code, _, err = cli("--filter", "this is not a filter")
    assert code == 2 and "invalid filter" in err

    assert main(["present", "--experiment", "no-such-experiment", "--tracking-uri", client.tracking_uri]) == 2
    missing_db = tmp_path / "absent" / "mlruns.db"
    assert main(["present", "--tracking-uri", f"sqlite:///{missing_db}"]) == 2
    assert not missing_db.exists()  # no empty store was created as a side effect
    with pytest.raises(CompareError, match="no runs to compare"):
        resolve_runs(client)


# ----------------------------------------------------------------------------------------------------------------
# Tables: params and metrics


def test_params_table_shows_only_differing_params(client: Any, experiment_id: str, cli: Any) -> None:
    make_run(client, experiment_id, "p-base")
    make_run(client, experiment_id, "p-lr", params={**PARAMS, "config.optim.lr": "0.0003", "extra": "[1, 2]"})
    code, out, err = cli("p-base", "p-lr")
    assert code == 0, err
    table = out.split("Params that differ")[1].split("Metrics")[0]
    assert "(2 of 4)" in table
    lr_row = next(line for line in table.splitlines() if "config.optim.lr" in line)
    assert "0.0001" in lr_row and "0.0003" in lr_row
    extra_row = next(line for line in table.splitlines() if "extra" in line)
    assert "—" in extra_row and "[1, 2]" in extra_row  # absent in one run; brackets are not rich markup
    assert "world_size" not in table and "git.commit" not in table

    code, out, _ = cli("p-base", "p-lr", "--all-params", "--ignore-params", "git.*")
    assert code == 0
    assert "All params (3)" in out and "world_size" in out and "git.commit" not in out


def test_diff_params_marks_missing_values() -> None:
    def run(params: dict[str, str]) -> RunData:
        return RunData("0" * 32, "r", "e", "FINISHED", None, None, params, {}, [])

    rows, total = diff_params([run({"a": "1", "b": "2"}), run({"a": "1", "c": "3"})])
    assert total == 3
    assert [(r.key, r.values) for r in rows] == [("b", ["2", None]), ("c", [None, "3"])]


def test_final_and_best_values(client: Any, experiment_id: str, cli: Any, tmp_path: Path) -> None:
    metrics = {
        "loss": LOSS,
        "lr": [1e-4, 2e-4, 3e-4, 2e-4, 1e-4],
        "samples_per_second": [10.0, 30.0, 20.0, 25.0, 15.0],
    }
    make_run(client, experiment_id, "fb-a", metrics=metrics, status="KILLED")
    make_run(client, experiment_id, "fb-b", metrics={**metrics, "loss": [5.0, 4.0, 3.0, 2.9, 2.8]})
    out_json = tmp_path / "summary.json"
    code, out, err = cli("fb-a", "fb-b", "--json", str(out_json))
    assert code == 0, err
    assert "KILLED" in out and "FINISHED" in out and "1m30s" in out  # status and duration
    assert " 2.2 @ 5 " in out and " 2 @ 4 " in out  # loss of fb-a: final @ step, best @ step

    data = json.loads(out_json.read_text())
    a = data["runs"][0]["metrics"]
    assert a["loss"] == {"goal": "min", "final": 2.2, "final_step": 5, "best": 2.0, "best_step": 4, "num_steps": 5}
    assert (a["samples_per_second"]["goal"], a["samples_per_second"]["best"]) == ("max", 30.0)
    assert a["samples_per_second"]["best_step"] == 2
    assert (a["lr"]["goal"], a["lr"]["best"], a["lr"]["final"]) == ("none", None, 1e-4)
    assert data["runs"][1]["metrics"]["loss"]["best"] == 2.8
    assert data["runs"][0]["status"] == "KILLED" and data["runs"][0]["duration_s"] == 90.0

    # --goal overrides the naming rule.
    code, _, _ = cli("fb-a", "--metrics", "samples_per_second", "--goal", "samples_*=min", "--json", str(out_json))
    summary = json.loads(out_json.read_text())["runs"][0]["metrics"]["samples_per_second"]
    assert code == 0 and (summary["goal"], summary["best"], summary["best_step"]) == ("min", 10.0, 1)


def test_goal_rule_and_summary_edge_cases() -> None:
    assert metric_goal("loss") == metric_goal("loss/vqa") == metric_goal("grad_norm") == "min"
    assert metric_goal("mfu") == metric_goal("samples_per_second") == metric_goal("val/accuracy") == "max"
    assert metric_goal("lr") == metric_goal("train/learning_rate") == "none"
    assert metric_goal("loss", [("loss*", "max")]) == "max"
    summary = summarise_curve({1: math.nan, 2: 3.0, 3: 1.0, 4: 1.0}, "min")
    assert summary is not None and (summary.best, summary.best_step, summary.final) == (1.0, 3, 1.0)  # first best
    assert summarise_curve({}, "min") is None


def test_repeated_steps_keep_the_last_logged_value() -> None:
    """A resumed run logs the steps after its last checkpoint again; the later values are the ones that count."""

    class M:
        def __init__(self, step: int, value: float, timestamp: int) -> None:
            self.step, self.value, self.timestamp = step, value, timestamp

    history = [M(1, 1.0, 10), M(2, 2.0, 20), M(3, 3.0, 30), M(2, 2.5, 40), M(3, 3.5, 50)]
    assert metric_curve(reversed(history)) == {1: 1.0, 2: 2.5, 3: 3.5}


# ----------------------------------------------------------------------------------------------------------------
# Plot and HTML


def test_plot_png_and_html(client: Any, experiment_id: str, cli: Any, tmp_path: Path) -> None:
    make_run(client, experiment_id, "plot-a", metrics={"loss": LOSS, "lr": [1.0] * 5})
    make_run(client, experiment_id, "plot-b", metrics={"loss": [x * 1.1 for x in LOSS], "lr": [1.0] * 5})
    png, page = tmp_path / "out" / "curves.png", tmp_path / "report.html"
    code, out, err = cli("plot-a", "plot-b", "--plot", str(png), "--html", str(page), "--plot-metrics", "loss", "lr")
    assert code == 0, err
    assert png.stat().st_size > 0
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    text = page.read_text()
    assert "data:image/png;base64," in text and "plot-a" in text and "plot-b" in text and "Metrics" in text


def test_every_plot_panel_is_titled_labelled_and_has_a_legend() -> None:
    def run(name: str, curves: dict[str, dict[int, float]]) -> RunData:
        return RunData(name * 32, name, "e", "FINISHED", None, None, {}, {}, sorted(curves), curves)

    # Pretraining logs loss_v2 only on steps with auxiliary examples; run "b" never logged it.
    a = run("a", {"loss": {1: 9.1, 2: 11.4, 3: 8.9}, "loss_v2": {2: 18.2}, "lr": {1: 1e-4, 2: 2e-4, 3: 3e-4}})
    b = run("b", {"loss": {1: 9.0, 2: 9.2, 3: 8.8}, "lr": {1: 1e-4, 2: 2e-4, 3: 3e-4}})
    metrics = ["loss", "loss_v2", "lr"]
    fig = plot_metrics([a, b], metrics, log_y=True)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(metrics)
    for ax, metric in zip(panels, metrics):
        assert ax.get_title().startswith(metric) and ax.get_xlabel() == "step" and ax.get_ylabel() == metric
        legend = ax.get_legend()
        assert legend is not None, metric
        entries = [text.get_text() for text in legend.get_texts()]
        if metric == "loss_v2":
            assert entries == ["a", "b (not logged)"]
        else:
            assert entries == ["a", "b"]
    assert panels[0].get_yscale() == "log" and "(log scale)" in panels[0].get_title()


# ----------------------------------------------------------------------------------------------------------------
# --assert-equal


def test_assert_equal_identical_curves_pass(client: Any, experiment_id: str, cli: Any) -> None:
    metrics = {"loss": LOSS, "lr": [1e-4] * 5, "grad_norm": [1.0, 0.5, 0.4, 0.3, 0.2], "step_time": [1, 2, 3, 4, 5]}
    make_run(client, experiment_id, "eq-a", metrics=metrics)
    make_run(client, experiment_id, "eq-b", metrics={**metrics, "step_time": [9, 9, 9, 9, 9]})  # timings may differ
    code, out, err = cli("eq-a", "eq-b", "--assert-equal", "-q")
    assert code == 0, out + err
    assert "equal within rtol" in out and "loss, grad_norm, lr" in out and "step_time" not in out


def test_assert_equal_fails_beyond_rtol_and_passes_within(client: Any, experiment_id: str, cli: Any) -> None:
    make_run(client, experiment_id, "tol-a", metrics={"loss": LOSS})
    make_run(client, experiment_id, "tol-b", metrics={"loss": [4.0, 3.0, 2.5025, 2.0, 2.2022]})
    code, out, _ = cli("tol-a", "tol-b", "--assert-equal", "--rtol", "1e-4", "-q")
    assert code == 1
    assert "loss: tol-a vs tol-b: first differs at step 3: 2.5 vs 2.5025" in out and "2 of 5 steps differ" in out
    code, out, _ = cli("tol-a", "tol-b", "--assert-equal", "--rtol", "1e-2", "-q")
    assert code == 0 and "equal within rtol" in out
    code, out, _ = cli("tol-a", "tol-b", "--assert-equal", "--atol", "0.01", "-q")
    assert code == 0


def test_assert_equal_reports_missing_steps_and_metrics(client: Any, experiment_id: str, cli: Any) -> None:
    make_run(client, experiment_id, "ms-a", metrics={"loss": LOSS, "lr": [1.0] * 5})
    make_run(client, experiment_id, "ms-b", metrics={"loss": {1: 4.0, 2: 3.0, 3: 2.5, 7: 1.0}})
    code, out, _ = cli("ms-a", "ms-b", "--assert-equal", "-q", "--metrics", "loss", "lr")
    assert code == 1
    assert "steps only in ms-a: 4, 5" in out and "steps only in ms-b: 7" in out
    assert "lr: ms-a vs ms-b: not logged by ms-b" in out
    code, out, _ = cli("ms-a", "ms-b", "--assert-equal", "-q", "--metrics", "loss", "--allow-missing-steps")
    assert code == 0 and "equal within rtol" in out and "note:" in out


def test_assert_equal_needs_two_runs(client: Any, experiment_id: str, cli: Any) -> None:
    make_run(client, experiment_id, "alone")
    code, _, err = cli("alone", "--assert-equal")
    assert code == 2 and "at least two runs" in err


def test_values_close_and_pairwise_check() -> None:
    assert values_close(math.nan, math.nan, 0, 0) and not values_close(math.nan, 1.0, 1, 1)
    assert values_close(math.inf, math.inf, 0, 0) and not values_close(math.inf, 1e308, 1, 0)
    assert values_close(100.0, 101.0, 0.01, 0) and not values_close(100.0, 102.0, 0.01, 0)
    assert values_close(0.0, 1e-9, 0, 1e-8)

    def run(name: str, loss: list[float]) -> RunData:
        return RunData(name * 32, name, "e", "FINISHED", None, None, {}, {}, ["loss"], {"loss": dict(enumerate(loss))})

    check = compare_curves([run("a", [1, 2]), run("b", [1, 2]), run("c", [1, 3])], ["loss"])
    assert [(d.run_a, d.run_b, d.step) for d in check.differences] == [("a", "c", 1), ("b", "c", 1)]


# ----------------------------------------------------------------------------------------------------------------
# Baselines


def test_json_baseline_round_trip(client: Any, experiment_id: str, cli: Any, tmp_path: Path) -> None:
    make_run(client, experiment_id, "golden", metrics={"loss": [*LOSS, math.nan], "lr": [1.0] * 6})
    make_run(client, experiment_id, "candidate", metrics={"loss": [*LOSS, math.nan], "lr": [1.0] * 6})
    make_run(client, experiment_id, "drifted", metrics={"loss": [*LOSS[:-1], 9.0, math.nan], "lr": [1.0] * 6})
    golden = tmp_path / "golden.json"
    code, _, err = cli("golden", "--metrics", "loss", "lr", "--json", str(golden), "-q")
    assert code == 0, err
    json.loads(golden.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    (baseline,) = load_baseline(golden)
    assert baseline.baseline and math.isnan(baseline.histories["loss"][6]) and baseline.histories["loss"][4] == 2.0

    code, out, err = cli("candidate", "--baseline", str(golden), "--assert-equal")
    assert code == 0, out + err
    assert "golden [baseline]" in out and "equal within rtol: loss, lr" in out
    code, out, _ = cli("drifted", "--baseline", str(golden), "--assert-equal", "-q")
    assert code == 1 and "first differs at step 5: 2.2 vs 9.0" in out

    (tmp_path / "bad.json").write_text("{}")
    code, _, err = cli("candidate", "--baseline", str(tmp_path / "bad.json"))
    assert code == 2 and "not a biomedgpt-compare JSON summary" in err


# ----------------------------------------------------------------------------------------------------------------
# Stores that are missing, wrong or unreachable: one line naming the URI, exit 2, in seconds


def _only_error_line(err: str, uri: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biomedgpt-compare: error: "), err
    assert uri in lines[0] and "Traceback" not in err
    return lines[0]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on leaving: nothing listens there


def test_unreachable_server_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    uri = f"http://127.0.0.1:{_closed_port()}/"
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    env_before = {name: os.environ.get(name) for name in names}
    start = time.monotonic()
    code = main(["some-run", "--tracking-uri", uri])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 15, (code, elapsed, err)
    assert "cannot reach the MLflow server" in _only_error_line(err, uri)
    assert {name: os.environ.get(name) for name in names} == env_before  # its short limits were for the command only


def test_server_that_never_answers_times_out() -> None:
    import socket

    from biomedgpt.tracking.compare import open_client

    with socket.socket() as listening:  # accepts connections (the kernel's backlog) but never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        uri = f"http://127.0.0.1:{listening.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(CompareError, match=r"cannot reach the MLflow server .* within 1 s"):
            open_client(uri, timeout_s=1)
        assert time.monotonic() - start < 10


def test_http_server_that_is_not_mlflow(capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/not-mlflow"
        assert main(["some-run", "--tracking-uri", uri]) == 2
        assert "is not an MLflow tracking server (HTTP 404" in _only_error_line(capsys.readouterr().err, uri)
    finally:
        server.shutdown()
        server.server_close()


def test_bad_sqlite_stores_are_named_and_left_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    def check(uri: str, expected: str) -> None:
        assert main(["some-run", "--tracking-uri", uri]) == 2
        assert expected in _only_error_line(capsys.readouterr().err, uri)

    check(f"sqlite:///{tmp_path}/no-such-dir/mlruns.db", f"the directory {tmp_path}/no-such-dir does not exist")
    assert not (tmp_path / "no-such-dir").exists()

    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    check(f"sqlite:///{text}", "is not an SQLite database")

    other = tmp_path / "other.db"  # somebody else's SQLite database: MLflow must not add its tables to it
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE patients (id INTEGER)")
    connection.close()
    before = other.read_bytes()
    check(f"sqlite:///{other}", "is an SQLite database without MLflow's tables (no experiments, runs, metrics")
    assert other.read_bytes() == before

    check(f"sqlite:///{tmp_path}", "is not a file")


def test_bad_file_stores_and_schemes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def error(uri: str) -> str:
        assert main(["some-run", "--tracking-uri", uri]) == 2
        return _only_error_line(capsys.readouterr().err, uri)

    assert "does not exist" in error(f"file://{tmp_path}/absent")
    assert "does not exist" in error(str(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()
    assert "has no experiment folder with a meta.yaml" in error(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written into the directory

    message = error("garbage://somewhere/store")
    assert "unsupported tracking URI" in message and "sqlite:" in message and "http:" in message

    # A store that passes the checks but that MLflow itself refuses: its MlflowException as one line.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    assert "MLFLOW_ALLOW_FILE_STORE" in error(str(tmp_path / "mlruns"))
