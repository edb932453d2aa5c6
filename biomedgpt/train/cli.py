"""``biomedgpt-train --config NAME_OR_PATH [key=value ...]`` (also ``python -m biomedgpt.train``).

The same command runs under ``torchrun --nproc_per_node N``, ``deepspeed --num_gpus N`` and ``srun`` (one task per
device), and resumes from the newest complete checkpoint in ``checkpoint.dir`` when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence

import yaml

from biomedgpt.config_utils import ConfigError, config_to_dict, load_config
from biomedgpt.train.config import TrainConfig, preset_paths


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
        "--world-size", type=int, default=None, help="world size assumed by --dry-run (default: $WORLD_SIZE or 1)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    # DeepSpeed's launcher appends --local_rank=N; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def dry_run(config: TrainConfig, world_size: int) -> str:
    """The resolved config, DeepSpeed config, parameter counts and per-rank model-state memory, as text."""
    import torch

    from biomedgpt.model import BiomedGPTForConditionalGeneration, count_trainable_parameters
    from biomedgpt.model.config import ORIGINAL_VOCAB_SIZE
    from biomedgpt.train.engine import (
        load_tokenizer,
        model_config_for,
        model_state_bytes_per_rank,
        resolve_deepspeed_config,
        zero_stage,
    )

    # A dry run plans a GPU job from any machine: a bf16 config is not refused for lack of a local GPU.
    ds_config = resolve_deepspeed_config(config, world_size, cuda=True if config.precision == "bf16" else None)
    notes = []
    try:
        vocab_size = len(load_tokenizer(config))
    except FileNotFoundError as error:  # planning before the files are in place is fine
        vocab_size = ORIGINAL_VOCAB_SIZE
        notes.append(f"({error}; assuming the original {ORIGINAL_VOCAB_SIZE:,}-token vocabulary)")
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(model_config_for(config, vocab_size))
    trainable = count_trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    stage = zero_stage(ds_config)
    memory = model_state_bytes_per_rank(total, stage, world_size, config.precision == "bf16")
    lines = [
        "# resolved config",
        yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(),
        "# DeepSpeed config",
        json.dumps(ds_config, indent=2),
        "# model",
        f"size {config.model.size}: {total:,} parameters ({trainable:,} trainable), vocabulary {vocab_size:,}",
        *notes,
        f"# memory of model states per rank (ZeRO stage {stage}, world size {world_size}, {config.precision})",
    ]
    lines += [f"{name}: {value / 2**30:.3f} GiB" for name, value in memory.items()]
    lines.append("(activations, buffers and communication buckets come on top)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(TrainConfig, args.config, args.overrides, presets=preset_paths())
        if args.dry_run:
            world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            print(dry_run(config, world_size))
            return 0
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"biomedgpt-train: error: {error}", file=sys.stderr)
        return 2
    from biomedgpt.train.checkpointing import ResumeError
    from biomedgpt.train.trainer import Trainer

    try:
        return Trainer(config).run()
    except ResumeError as error:
        print(f"biomedgpt-train: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
