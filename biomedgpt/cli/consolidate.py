"""``biomedgpt-consolidate CKPT_DIR OUT_DIR``: a DeepSpeed ZeRO checkpoint -> a Hugging Face model directory.

Examples::

    biomedgpt-consolidate checkpoints/run models/run-final                      # the tag in checkpoints/run/latest
    biomedgpt-consolidate checkpoints/run models/run-50 --tag step_00000050 --dtype bf16 --verify
    biomedgpt-consolidate old_run/ckpt models/old --config-from pretrain_base --tokenizer data/tokenizer

Runs on CPU with any number of cores, whatever world size trained the checkpoint (stage 1, 2 or 3). OUT_DIR gets
``config.json``, ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``)
and the tokenizer files; load it with ``BiomedGPTForConditionalGeneration.from_pretrained(OUT_DIR)`` or start a run
from it with ``model.init_from=OUT_DIR``. A ``causal_lm`` run's checkpoint (its ``config.json`` names a Hugging Face
``model_type`` such as llama) becomes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

The model config and tokenizer are read from the checkpoint (``config.json`` and ``tokenizer/`` next to the tags, as
the trainer writes them); for older checkpoints give ``--config-from`` (the training preset or YAML, or a
``config.json``) and ``--tokenizer``. Exit status: 0 success, 1 verification failed, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from biomedgpt.checkpoint.errors import DEFAULT_MAX_SHARD_SIZE, ConsolidationError
from biomedgpt.output_dirs import OutputDirError

PROG = "biomedgpt-consolidate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a DeepSpeed ZeRO checkpoint into a Hugging Face model directory (on CPU).",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint_dir", metavar="CKPT_DIR", help="checkpoint directory (holds 'latest' and tags)")
    parser.add_argument("output_dir", metavar="OUT_DIR", help="Hugging Face model directory to write")
    parser.add_argument("--tag", default="latest", help="tag to read, e.g. step_00000050 (default: the 'latest' file)")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16"), help="floating-point dtype of the output (default fp32)"
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors file, e.g. 500MB, 2GB, 1GiB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument(
        "--config-from",
        metavar="SRC",
        help="model config when the checkpoint has none: a training preset or YAML, a config.json or a model dir",
    )
    parser.add_argument(
        "--set",
        dest="config_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override in the training config given by --config-from (repeatable), e.g. model.size=base",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory when the checkpoint has none")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="load the result, compare every tensor with a reference and run a forward pass with both "
        "(holds the model twice in memory)",
    )
    parser.add_argument(
        "--verify-against",
        metavar="FILE",
        help="reference weights for --verify (implies it): a .pt or .safetensors state dict gathered from the "
        "engine; default: DeepSpeed's own zero_to_fp32 reading of the checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier consolidation in OUT_DIR (only the files it wrote; a directory holding anything "
        "else, or the checkpoint itself, is refused)",
    )
    parser.add_argument(
        "--trained-only",
        action="store_true",
        help="write only the parameters that trained (e.g. a vlm_align run's projector) to "
        "OUT_DIR/trained_parameters.safetensors, with the config and tokenizer",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def training_config_builder(source: str, overrides: Sequence[str]) -> Any:
    """A :class:`~biomedgpt.checkpoint.consolidate.ConfigBuilder` for a training preset or YAML (and ``--set``
    overrides): the model config and tokenizer that run trained. The trainer owns that config; the checkpoint
    tools are handed the result, so they never import the trainer."""
    from pathlib import Path

    from biomedgpt.checkpoint.consolidate import ConfigBuilder, read_model_config
    from biomedgpt.config_utils import ConfigError
    from biomedgpt.train.config import load_run_config

    try:
        train_config = load_run_config(source, list(overrides))
    except (ConfigError, FileNotFoundError) as error:
        raise ConsolidationError(f"--config-from {source}: {error}") from error

    if train_config.recipe == "causal_lm":
        return _causal_lm_builder(source, train_config)

    def build(tokenizer: Any) -> Any:
        from biomedgpt.train.recipes.biomedgpt import model_config_for  # imports the model family: only when used

        if train_config.model.init_from:  # the run started from a model directory and kept its config
            return read_model_config(Path(train_config.model.init_from) / "config.json")
        return model_config_for(train_config, len(tokenizer))

    return ConfigBuilder(
        origin=f"training config {source}",
        build=build,
        tokenizer=lambda: _recipe_tokenizer(train_config),
        tokenizer_origin=train_config.data.tokenizer or "the packaged default tokenizer (training config)",
    )


def _causal_lm_builder(source: str, train_config: Any) -> Any:
    """A causal_lm run's model: its ``model.path`` config or inline ``model.config``, its tokenizer."""
    from biomedgpt.checkpoint.consolidate import ConfigBuilder
    from biomedgpt.checkpoint.model_formats import CausalLMFormat

    def build(tokenizer: Any) -> Any:
        from biomedgpt.train.recipes.causal_lm_preflight import model_config

        return model_config(train_config)

    def tokenizer() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_origin)

    tokenizer_origin = train_config.data.tokenizer or train_config.model.path
    return ConfigBuilder(f"training config {source}", build, tokenizer, tokenizer_origin, CausalLMFormat())


def _recipe_tokenizer(train_config: Any) -> Any:
    from biomedgpt.train.recipes.biomedgpt import load_tokenizer

    return load_tokenizer(train_config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trained_only and (args.verify or args.verify_against):
        parser.error("--trained-only writes no loadable model: --verify needs the whole one")
    from biomedgpt.checkpoint.consolidate import consolidate_checkpoint, is_model_config, verify_consolidated

    out = sys.stdout
    try:
        # DeepSpeed logs and prints to stdout: send that to stderr, so stdout holds only the summary lines.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.showwarning = _show_warning
            config_from = args.config_from
            if config_from is not None and not is_model_config(config_from):
                config_from = training_config_builder(config_from, args.config_overrides)
            elif args.config_overrides:
                raise ConsolidationError("--set applies to a training preset or YAML given by --config-from")
            result = consolidate_checkpoint(
                args.checkpoint_dir,
                args.output_dir,
                tag=args.tag,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                config_from=config_from,
                tokenizer=args.tokenizer,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                trained_only=args.trained_only,
            )
            print(result.summary(), file=out, flush=True)
            if args.verify or args.verify_against:
                verification = verify_consolidated(result.output_dir, args.verify_against, result.source_dir)
                print(verification.summary(), file=out, flush=True)
                if not verification.ok:
                    return 1
    except (ConsolidationError, OutputDirError, OSError) as error:  # OSError: the output side (disk full, permissions)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
