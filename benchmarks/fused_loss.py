"""Peak memory and time of the loss over the 59k vocabulary: plain logits + loss vs the fused (chunked) loss.

Both variants compute the same :class:`biomedgpt.train.loss.LossOutput` and the gradients wrt the decoder's final
hidden states [B,T,d] and the tied output projection weight [V,d], forward plus backward:

- ``plain``: ``logits = hidden @ weight.T`` (fp32 [tokens, V]) then ``label_smoothed_cross_entropy(logits, ...)``,
  what the trainer does today;
- ``fused``: :func:`biomedgpt.train.fused_loss.fused_label_smoothed_cross_entropy` (logits of ``--chunk-size``
  target tokens at a time, recomputed in backward).

Peak memory is the highest number of CPU bytes torch's allocator had handed out during the step above what was
allocated before it (the inputs), from the allocation events of ``torch.profiler`` with ``profile_memory=True``
(tracemalloc does not see torch's allocations); the gradients the step creates count. As a cross-check the process's
resident-set high-water mark (``ru_maxrss``) is read before and after each profiled step: the fused step runs first,
so its growth is the fused step's own and the plain step's growth is what the plain step needs beyond that. Time is
the wall clock and the process's CPU time (all threads; other jobs on a shared machine distort it much less) of that
profiled step (the profiler records a few hundred events per step, nothing per element), with torch's default
intra-op threads; ``--repeats N`` adds N unprofiled steps per variant and reports the medians. The two profiled
steps' losses and gradients are compared.

Run: ``python benchmarks/fused_loss.py --json out.json --plot docs/benchmarks_fused_loss.png`` (about 2.5 minutes
on an idle 2-core machine at the defaults, V=59,457, 8,192 target tokens, d=768; the plain step needs about 8 GiB
of memory). Exit status 1 when the fused peak is above a quarter of the plain peak (the target at these sizes).
Results and their reading: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from biomedgpt.train.fused_loss import DEFAULT_CHUNK_SIZE, fused_label_smoothed_cross_entropy
from biomedgpt.train.loss import LossOutput, label_smoothed_cross_entropy
from biomedgpt.train.memory_profile import peak_allocated_bytes

GIB = 2**30


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    length = args.tokens // args.batch
    hidden = torch.randn(args.batch, length, args.dim, generator=gen)
    weight = torch.randn(args.vocab, args.dim, generator=gen) * args.dim**-0.5
    target = torch.randint(4, args.vocab, (args.batch, length), generator=gen)
    weights = torch.rand(args.batch, generator=gen) + 0.5  # per-example weights, as VQA answer confidences
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "target": target, "w": weights}


def step(variant: str, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> LossOutput:
    """One forward + backward; the gradients land in ``hidden.grad`` / ``weight.grad``."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    hidden.grad = weight.grad = None
    common = dict(
        epsilon=args.epsilon, padding_idx=1, example_weights=inputs["w"], drop_worst_ratio=args.drop_worst_ratio
    )
    if variant == "plain":
        out = label_smoothed_cross_entropy(hidden @ weight.t(), inputs["target"], **common)
    else:
        out = fused_label_smoothed_cross_entropy(hidden, weight, inputs["target"], chunk_size=args.chunk_size, **common)
    out.loss.backward()
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


def timed_step(
    variant: str, inputs: dict[str, torch.Tensor], args: argparse.Namespace
) -> tuple[LossOutput, float, float]:
    """The step's result, wall-clock seconds and CPU seconds of this process (all threads)."""
    gc.collect()
    tick, cpu_tick = time.perf_counter(), time.process_time()
    out = step(variant, inputs, args)
    return out, time.perf_counter() - tick, time.process_time() - cpu_tick


def measure(variant: str, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """One profiled step: its result, gradients, peak allocated bytes, RSS high-water growth and wall time."""
    rss_before = max_rss_bytes()
    (out, seconds, cpu_seconds), peak = peak_allocated_bytes(lambda: timed_step(variant, inputs, args))
    grads = inputs["hidden"].grad, inputs["weight"].grad
    inputs["hidden"].grad = inputs["weight"].grad = None
    return {
        "out": out,
        "grads": grads,
        "peak_allocated_bytes": peak,
        "max_rss_growth_bytes": max_rss_bytes() - rss_before,
        "seconds": [seconds],
        "cpu_seconds": [cpu_seconds],
    }


def compare(fused: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    """Relative errors of the fused loss's values and gradients against the plain loss's."""
    f, p = fused["out"], plain["out"]
    if f.ntokens != p.ntokens or not torch.equal(f.per_example_tokens, p.per_example_tokens):
        raise SystemExit(f"fused and plain losses cover different tokens: {f.ntokens} vs {p.ntokens}")
    return {
        "loss": relative_error(f.loss.detach(), p.loss.detach()),
        "nll_loss": relative_error(f.nll_loss.detach(), p.nll_loss.detach()),
        "per_example": relative_error(f.per_example, p.per_example),
        "grad_hidden": relative_error(fused["grads"][0], plain["grads"][0]),
        "grad_weight": relative_error(fused["grads"][1], plain["grads"][1]),
    }


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    variants = ["plain", "fused"]
    labels = ["plain: logits + loss", f"fused: chunks of {setup['chunk_size']} tokens"]
    colors = ["#9e9e9e", "#1f77b4"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4.2))
    peaks = [results["variants"][v]["peak_allocated_bytes"] / GIB for v in variants]
    times = [results["variants"][v]["cpu_seconds_median"] for v in variants]
    for ax, values, unit, title in (
        (ax_mem, peaks, "GiB", "peak memory allocated (forward + backward)"),
        (ax_time, times, "s", "CPU seconds per step (forward + backward, all threads)"),
    ):
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{value:.2f} {unit}" for value in values])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(values) * 1.18)
    ax_mem.axhline(peaks[0] / 4, color="#d62728", linestyle="--", linewidth=1, label="target: plain / 4")
    ax_mem.legend(loc="upper right", fontsize=9)
    ratio = peaks[1] / peaks[0]
    fig.suptitle(
        f"Label-smoothed CE over V={setup['vocab']:,}, {setup['tokens']:,} target tokens, d={setup['dim']}, fp32, "
        f"{setup['machine']} (fused peak = {ratio:.3f} x plain)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=59_457, help="classes V (default 59,457, BiomedGPT's)")
    parser.add_argument("--tokens", type=int, default=8192, help="target tokens in the batch (default 8,192)")
    parser.add_argument("--batch", type=int, default=64, help="examples the tokens are split into (default 64)")
    parser.add_argument("--dim", type=int, default=768, help="hidden size d (default 768, base)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="fused loss's tokens per chunk")
    parser.add_argument("--epsilon", type=float, default=0.1, help="label smoothing (default 0.1)")
    parser.add_argument("--drop-worst-ratio", type=float, default=0.0, help="drop-worst ratio (default 0)")
    parser.add_argument("--repeats", type=int, default=0, help="unprofiled timed steps per variant (default 0)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="write a bar chart (PNG) here")
    args = parser.parse_args(argv)
    if args.tokens % args.batch:
        parser.error(f"--tokens {args.tokens} must be a multiple of --batch {args.batch}")

    started = time.perf_counter()
    inputs = make_inputs(args)
    measured: dict[str, dict[str, Any]] = {}
    for variant in ("fused", "plain"):  # fused first: see the module docstring on ru_maxrss
        measured[variant] = measure(variant, inputs, args)
        print(f"{variant}: peak {measured[variant]['peak_allocated_bytes'] / GIB:.2f} GiB allocated", flush=True)
    errors = compare(measured["fused"], measured["plain"])
    print("fused vs plain, relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    variants = {name: {k: v for k, v in m.items() if k not in ("out", "grads")} for name, m in measured.items()}
    del measured
    for _ in range(args.repeats):
        for variant in ("plain", "fused"):
            _, seconds, cpu_seconds = timed_step(variant, inputs, args)
            variants[variant]["seconds"].append(seconds)
            variants[variant]["cpu_seconds"].append(cpu_seconds)
            inputs["hidden"].grad = inputs["weight"].grad = None
    for values in variants.values():
        values["seconds_median"] = statistics.median(values["seconds"])
        values["cpu_seconds_median"] = statistics.median(values["cpu_seconds"])

    logits_bytes = args.tokens * args.vocab * 4
    ratio = variants["fused"]["peak_allocated_bytes"] / variants["plain"]["peak_allocated_bytes"]
    print(
        f"\nV={args.vocab:,}, {args.tokens:,} target tokens ({args.batch} x {args.tokens // args.batch}), d={args.dim}"
    )
    print(f"fp32 logits of the batch: {logits_bytes / GIB:.2f} GiB; fused chunk: {args.chunk_size} tokens\n")
    print("| variant | peak allocated (GiB) | vs plain | RSS growth (GiB) | wall (s) | CPU (s) | CPU vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    plain = variants["plain"]
    for variant in ("plain", "fused"):
        v = variants[variant]
        print(
            f"| {variant} | {v['peak_allocated_bytes'] / GIB:.2f} "
            f"| {v['peak_allocated_bytes'] / plain['peak_allocated_bytes']:.3f} "
            f"| {v['max_rss_growth_bytes'] / GIB:.2f} | {v['seconds_median']:.1f} | {v['cpu_seconds_median']:.1f} "
            f"| {v['cpu_seconds_median'] / plain['cpu_seconds_median']:.2f} |"
        )
    print(f"\nfused peak / plain peak = {ratio:.3f} (target <= 0.25): {'met' if ratio <= 0.25 else 'NOT met'}")
    print(f"total {time.perf_counter() - started:.0f} s")

    results = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            "machine": f"{torch.get_num_threads()}-thread {platform.machine()} CPU",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "errors": errors,
        "variants": variants,
        "fused_over_plain_peak": ratio,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        write_plot(results, args.plot)
    return 0 if ratio <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
