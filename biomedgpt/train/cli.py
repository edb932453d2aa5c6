"""``biomedgpt-train --config NAME_OR_PATH [key=value ...]`` (also ``python -m biomedgpt.train``).

The same command runs under ``torchrun --nproc_per_node N``, ``deepspeed --num_gpus N`` and ``srun`` (one task per
device), or without a launcher as a single rank, and resumes from the newest complete checkpoint in
``checkpoint.dir`` when there is one. The config's input paths are checked before any process group starts.

Only light modules are imported at start-up: ``--help`` and config errors must not wait for torch, transformers
and DeepSpeed (seconds each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any

import yaml

from biomedgpt.config_utils import ConfigError, config_to_dict
from biomedgpt.train.config import load_run_config, preset_paths

# What torchrun sets for every rank (streaming needs LOCAL_WORLD_SIZE too); a plain start sets them for one rank.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
SINGLE_RANK_NOTE = "no launcher found: running as 1 rank; use torchrun --nproc_per_node N for more"
PLANNING_HINT = "Fix them in the config or as key=value overrides; --dry-run --allow-missing-data plans without them."
START_HINT = "Nothing was started. Fix them in the config or as key=value overrides."


def free_local_port() -> int:
    """A TCP port on localhost that nothing listens on (for a single-node rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(config: str, overrides: Sequence[str], nproc: int) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node=N -m biomedgpt.train --config CONFIG OVERRIDES`` on this
    node, with a free rendezvous port."""
    port = free_local_port()
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
        "-m", "biomedgpt.train", "--config", config, *overrides,
    ]  # fmt: skip


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a world size of 0 or below cannot split a batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def single_rank_environment(environ: MutableMapping[str, str]) -> bool:
    """Without any launcher, make this process rank 0 of 1 (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, a free ``MASTER_PORT``); True when it did.

    torchrun, the deepspeed launcher, ``srun`` and ``mpirun`` are left alone (``biomedgpt.runtime.launcher_env``
    maps the latter two); a partial set of the variables is an error rather than a guess.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return False
    from biomedgpt.runtime.launcher_env import detect_distributed_env

    present = [name for name in LAUNCH_VARIABLES if name in environ]
    others = {key: value for key, value in environ.items() if key not in LAUNCH_VARIABLES}
    if detect_distributed_env(others).launcher != "none":
        return False
    if present:
        raise ValueError(
            f"the environment sets {', '.join(present)} but not both RANK and WORLD_SIZE; start with torchrun "
            f"--nproc_per_node N (which sets them all), or unset {', '.join(present)} to run as 1 rank"
        )
    environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(free_local_port()))
    return True


def dry_run_world_size(given: int | None) -> int:
    if given is not None:
        return given
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"environment variable WORLD_SIZE={text!r}: {error}; or pass --world-size N") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    presets = ", ".join(preset_paths())
    parser = argparse.ArgumentParser(
        prog="biomedgpt-train",
        description="Pretrain or fine-tune BiomedGPT with DeepSpeed (ZeRO-3), streamed Parquet data and MLflow.",
        epilog=f"presets: {presets}. Overrides: dotted keys, e.g. optim.lr=1e-4 batch.micro_batch_size=2",
    )
    parser.add_argument("--config", required=True, help=f"preset name ({presets}) or a YAML/JSON file")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configs and memory estimate")
    parser.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        help="world size (>= 1) assumed by --dry-run (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--allow-missing-data",
        action="store_true",
        help="with --dry-run: report missing data/tokenizer/model paths as warnings and plan anyway",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    # DeepSpeed's launcher appends --local_rank=N; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allow_missing_data and not args.dry_run:
        parser.error("--allow-missing-data only goes with --dry-run: a training run needs its inputs")
    return args


def dry_run(config: Any, world_size: int) -> str:
    """The resolved config, DeepSpeed config, the model (built on the meta device: no weights are read) and per-rank
    model-state memory, as text, for any recipe."""
    from biomedgpt.train.engine import resolve_deepspeed_config
    from biomedgpt.train.recipes import recipe_class

    # A dry run plans a GPU job from any machine: a bf16 config is not refused for lack of a local GPU.
    ds_config = resolve_deepspeed_config(config, world_size, cuda=True if config.precision == "bf16" else None)
    model, model_lines = recipe_class(config.recipe).plan_model(config)
    return plan_text(config, ds_config, world_size, model, model_lines)


def plan_text(config: Any, ds_config: dict[str, Any], world_size: int, model: Any, model_lines: list[str]) -> str:
    """A dry run's report, for every recipe: resolved config, DeepSpeed config, the model lines, and the memory of
    model states per rank for ``model`` (built on the meta device)."""
    from biomedgpt.train.engine import largest_layer_parameters, model_state_bytes_per_rank, zero_stage

    stage = zero_stage(ds_config)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    memory = model_state_bytes_per_rank(
        parameters, stage, world_size, config.precision == "bf16", largest_layer_parameters(model), trainable
    )
    lines = [
        "# resolved config",
        yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(),
        "# DeepSpeed config",
        json.dumps(ds_config, indent=2),
        "# model",
        *model_lines,
        f"# memory of model states per rank (ZeRO stage {stage}, world size {world_size}, {config.precision})",
    ]
    lines += [f"{name}: {value / 2**30:.3f} GiB" for name, value in memory.items()]
    lines.append("(activations, buffers and communication buckets come on top)")
    return "\n".join(lines)


def show_warnings(source: str, warnings: list[str]) -> None:
    """The start check's warnings, loudly; the demo preset's own demo tokenizer is what that tokenizer is for."""
    if source != "demo":
        for warning in warnings:
            print(f"biomedgpt-train: {warning}", file=sys.stderr, flush=True)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (a test may have replaced it since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def log_progress_to_stdout() -> None:
    """The project's INFO log lines (steps, validation, resuming, stopping) as plain lines on stdout, where SLURM
    output files and the launchers' logs collect them; other libraries' loggers are left as they are."""
    project = logging.getLogger("biomedgpt")
    if not any(isinstance(handler, _StdoutHandler) for handler in project.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        project.addHandler(handler)
    project.setLevel(logging.INFO)
    project.propagate = False


def train(config: Any) -> int:
    from biomedgpt.train.checkpointing import ResumeError
    from biomedgpt.train.trainer import Trainer

    log_progress_to_stdout()
    try:
        return Trainer(config).run()
    except ResumeError as error:
        print(f"biomedgpt-train: error: {error}", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        from biomedgpt.train.recipes import recipe_start_checks

        start_checks = recipe_start_checks(config.recipe)
        if args.dry_run:
            world_size = dry_run_world_size(args.world_size)
            show_warnings(args.config, start_checks(config, allow_missing=args.allow_missing_data, hint=PLANNING_HINT))
            print(dry_run(config, world_size))
            return 0
        # Before the process group and DeepSpeed's op builds: a wrong path fails in seconds, not minutes.
        warnings = start_checks(config, hint=START_HINT)
        from biomedgpt.train.recipes import recipe_class

        recipe_class(config.recipe).check_environment(config)
        if single_rank_environment(os.environ):
            print(f"biomedgpt-train: {SINGLE_RANK_NOTE}", file=sys.stderr, flush=True)
        from biomedgpt.runtime.launcher_env import detect_distributed_env

        if detect_distributed_env().rank == 0:
            show_warnings(args.config, warnings)
    except (ConfigError, ValueError, OSError) as error:  # OSError: a model directory transformers cannot read
        print(f"biomedgpt-train: error: {error}", file=sys.stderr)
        return 2
    return train(config)


def run() -> None:
    """``biomedgpt-train`` and ``python -m biomedgpt.train``: ``main``, and a rank that returned from it skips the
    interpreter's teardown (2-3 s per rank; see ``biomedgpt.runtime.process_exit``). An exception propagates as
    usual, with its traceback."""
    from biomedgpt.runtime.process_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    run()
