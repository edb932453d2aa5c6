"""``biomedgpt-compare``: compare MLflow training runs: differing params, final and best metrics, curves.

Examples::

    biomedgpt-compare baseline refactor                     # runs by name (or 32-hex id) from ./mlruns.db
    biomedgpt-compare --experiment pretrain --filter "params.config.optim.lr = '0.0001'"
    biomedgpt-compare RUN_A RUN_B --metrics loss 'loss/*' lr --plot curves.png --html report.html
    biomedgpt-compare RUN_A RUN_B --assert-equal --rtol 1e-6  # exit 1 if the loss/lr/grad_norm curves differ
    biomedgpt-compare golden --metrics loss lr --json golden.json          # record a baseline ...
    biomedgpt-compare new --baseline golden.json --assert-equal -q         # ... and check a new run against it

RUN is a run id or a run name (newest run of that name, with a warning, unless --all-matching). Put RUNs before
options that take several values (--metrics, --plot-metrics, --ignore-params), or after ``--``.

Metrics: the table shows every metric all runs logged (MLflow system/* metrics left out) or --metrics (names or
globs). "Best" is the min, except for names with acc/accuracy/score/bleu/rouge/cider/meteor/spice/f1/auc/
precision/recall/mfu/hfu/tflops/per_second/throughput (max) and lr/learning_rate/epoch/step (no best);
--goal GLOB=min|max|none overrides. The plot shows --plot-metrics, else --metrics, else loss, one panel per
metric with its own legend (runs that did not log it are marked "not logged"). --assert-equal compares --metrics,
else the common ones among loss, loss_*, loss/*, objective, lr and grad_norm, for every pair of runs on the same
steps; values a, b are equal when |a - b| <= max(rtol * max(|a|, |b|), atol) (default: exactly equal).

Stores are checked before use: an http(s) server must answer within 5 s, an SQLite file or mlruns directory must
exist and be an MLflow store (nothing is created), an unknown scheme lists the supported ones.

Exit status: 0 success (curves equal), 1 curves differ, 2 usage error, a run or experiment not found, or a store
missing, unreachable or not an MLflow store (one line naming the URI).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, get_args

from biomedgpt.tracking.compare import (
    DEFAULT_ASSERT_METRICS,
    CompareError,
    CompareWarning,
    Goal,
    RunData,
    assign_labels,
    build_comparison,
    common_metrics,
    compare_curves,
    comparison_to_dict,
    expand_metrics,
    load_baseline,
    load_histories,
    open_client,
    plot_metrics,
    render,
    resolve_runs,
    run_data,
    save_figure,
    write_html,
    write_json,
)

PROG = "biomedgpt-compare"


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _goal(text: str) -> tuple[str, Goal]:
    pattern, sep, goal = text.rpartition("=")
    if not sep or not pattern or goal not in get_args(Goal):
        raise argparse.ArgumentTypeError(f"expected GLOB=min|max|none, got {text!r}")
    return pattern, goal  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN", help="run id or run name")

    sel = p.add_argument_group("selecting runs")
    sel.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db)"
    )
    sel.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="look names and --filter up in this experiment (repeatable); alone: all its runs",
    )
    sel.add_argument("--filter", metavar="EXPR", help="add the runs matching an MLflow search filter")
    sel.add_argument("--all-matching", action="store_true", help="take every run with a given name, not the newest")
    sel.add_argument("--max-runs", type=int, default=100, metavar="N", help="at most N runs from --filter (100)")
    sel.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="FILE.json",
        help="also compare the runs saved by an earlier --json (they come first)",
    )

    what = p.add_argument_group("what to show")
    what.add_argument("--metrics", nargs="+", metavar="M", help="metrics (names or globs) for the table and checks")
    what.add_argument("--all-params", action="store_true", help="list every param, not only those that differ")
    what.add_argument("--ignore-params", nargs="+", default=[], metavar="GLOB", help="params to leave out")
    what.add_argument(
        "--goal",
        action="append",
        type=_goal,
        default=[],
        metavar="GLOB=GOAL",
        help="best value of matching metrics is their min, max or none (repeatable; first match wins)",
    )
    what.add_argument("-q", "--quiet", action="store_true", help="no tables (warnings, errors and checks still print)")

    out = p.add_argument_group("outputs")
    out.add_argument("--plot", metavar="FILE.png", help="write the curves against step (also .svg, .pdf)")
    out.add_argument("--plot-metrics", nargs="+", metavar="M", help="metrics to plot (default: --metrics, else loss)")
    out.add_argument("--log-y", action="store_true", help="logarithmic y axis (where all values are positive)")
    out.add_argument("--html", metavar="FILE.html", help="write a self-contained page with the tables and the plot")
    out.add_argument("--json", metavar="FILE.json", help="write a machine-readable summary, usable as --baseline")

    check = p.add_argument_group("checking curves")
    check.add_argument("--assert-equal", action="store_true", help="exit 1 unless every pair of curves is equal")
    check.add_argument("--rtol", type=_non_negative, default=0.0, metavar="R", help="relative tolerance (default 0)")
    check.add_argument("--atol", type=_non_negative, default=0.0, metavar="A", help="absolute tolerance (default 0)")
    check.add_argument(
        "--allow-missing-steps",
        action="store_true",
        help="compare the steps the runs share instead of failing when their step sets differ",
    )
    return p


@contextlib.contextmanager
def _short_http_limits() -> Iterator[None]:
    """For this command only, the tracker's short MLflow HTTP retry and timeout limits where the user set none:
    MLflow's defaults (7 retries with backoff, 120 s timeout) keep a failing request going for minutes."""
    from biomedgpt.tracking.mlflow_tracker import _HTTP_ENV_DEFAULTS

    added = {name: value for name, value in _HTTP_ENV_DEFAULTS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from biomedgpt.tracking.mlflow_tracker import default_tracking_uri

    runs: list[RunData] = []
    for path in args.baseline:
        runs.extend(load_baseline(path))
    client = None
    if args.runs or args.filter is not None or args.experiment:
        client = open_client(args.tracking_uri or default_tracking_uri())
        experiment_names: dict[str, str] = {}
        found = resolve_runs(
            client,
            args.runs,
            experiments=args.experiment,
            filter_string=args.filter,
            all_matching=args.all_matching,
            max_results=args.max_runs,
        )
        runs.extend(run_data(client, run, experiment_names) for run in found)
    if not runs:
        raise CompareError("no runs to compare: give run ids or names, --filter, --experiment or --baseline")
    assign_labels(runs)

    # Which metrics each output uses (see the module docstring).
    table_metrics = expand_metrics(runs, args.metrics) if args.metrics else common_metrics(runs)
    if args.plot_metrics:
        plotted = expand_metrics(runs, args.plot_metrics)
    elif args.metrics:
        plotted = table_metrics
    else:
        plotted = ["loss"] if any("loss" in r.metric_keys for r in runs) else table_metrics[:1]
    if args.metrics:
        checked = table_metrics
    else:
        checked = [m for m in common_metrics(runs) if _matches(m, DEFAULT_ASSERT_METRICS)]
    wanted = list(dict.fromkeys(table_metrics + plotted + checked))
    load_histories(client, runs, wanted)

    comparison = build_comparison(
        runs, table_metrics, all_params=args.all_params, ignore_params=args.ignore_params, goals=args.goal
    )
    check = None
    if args.assert_equal:
        check = compare_curves(
            runs, checked, rtol=args.rtol, atol=args.atol, allow_missing_steps=args.allow_missing_steps
        )

    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not args.quiet:
        render(comparison, console)
    fig = plot_metrics(runs, plotted, log_y=args.log_y) if (args.plot or args.html) else None
    written = []
    if args.plot and fig is not None:
        save_figure(fig, args.plot)
        written.append(args.plot)
    if args.html:
        write_html(args.html, comparison, fig, check)
        written.append(args.html)
    if args.json:
        write_json(args.json, comparison_to_dict(comparison, check, history_metrics=wanted))
        written.append(args.json)
    if written and not args.quiet:
        console.print(f"Wrote {', '.join(written)}", highlight=False)
    if check is not None:
        print(check.summary(), flush=True)
        return 0 if check.equal else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", CompareWarning)
        original = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
            if issubclass(category, CompareWarning):  # ours: one plain line; others as usual
                print(f"{PROG}: warning: {message}", file=sys.stderr)
            else:
                original(message, category, *rest, **kwargs)

        warnings.showwarning = show
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with _short_http_limits():
                return _compare(args)
        except CompareError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        except (MlflowException, SQLAlchemyError) as exc:  # the store failed after the checks of open_client
            from biomedgpt.tracking.mlflow_tracker import _redact, default_tracking_uri

            uri = _redact(args.tracking_uri or default_tracking_uri())
            text = " ".join(str(getattr(exc, "message", None) or exc).split())
            print(f"{PROG}: error: MLflow store {uri}: {text}", file=sys.stderr)
        except OSError as exc:  # writing --plot/--html/--json, reading a store file: the message names the path
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
