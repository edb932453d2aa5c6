"""``biomedgpt-import``: convert a released BiomedGPT/OFA checkpoint into this project's Hugging Face format.

Examples::

    biomedgpt-import biomedgpt_base.pt out/biomedgpt-base --bpe-dir BiomedGPT/utils/BPE
    biomedgpt-import vqa_rad_fixed.pt out/vqa-rad --ema --bpe-dir BiomedGPT/utils/BPE
    biomedgpt-import PanaceaAI/BiomedGPT-Base-Pretrained/ out/biomedgpt-base-hf

SOURCE is a fairseq ``.pt`` training checkpoint (weights under ``model``, EMA weights under
``extra_state.ema``, run configuration under ``cfg``/``args``) or a directory written by the transformers OFA
port (``config.json`` + ``pytorch_model.bin``/``model.safetensors`` + ``vocab.json``/``merges.txt``).

The architecture comes from the tensor shapes and the checkpoint's own configuration; ``--size`` and
``--normformer``/``--no-normformer`` override them (a mismatch is then an error that says so). The
vocabulary size is the embedding's row count; ``--bpe-dir`` (``encoder.json``, ``vocab.bpe``, ``dict.txt``)
writes the matching tokenizer. OUT_DIR receives ``config.json``, ``model.safetensors``, the tokenizer files
and ``import_report.json`` (renamed, dropped, unexpected and missing keys, warnings).

fairseq checkpoints are pickles: unpickling runs code, so import only checkpoints from sources you trust.
Exit status: 0 success, 1 the checkpoint does not fit (message says why), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from biomedgpt.checkpoint.errors import CheckpointImportError
from biomedgpt.output_dirs import OutputDirError

if TYPE_CHECKING:  # the importer pulls in torch and transformers: loaded after parsing, so --help stays instant
    from biomedgpt.checkpoint.importer import ImportReport

# The published sizes, as biomedgpt.model.config.MODEL_SIZES names them (checked there after parsing).
SIZE_NAMES = ("tiny", "medium", "base", "large", "xlarge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biomedgpt-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", metavar="SOURCE", help="fairseq .pt file or transformers OFA directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (save_pretrained layout)")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights (extra_state.ema) of a fairseq .pt")
    parser.add_argument(
        "--bpe-dir", metavar="DIR", help="directory with encoder.json, vocab.bpe and dict.txt (BiomedGPT utils/BPE)"
    )
    parser.add_argument("--size", choices=SIZE_NAMES, help="force a published size instead of reading the checkpoint")
    normformer = parser.add_mutually_exclusive_group()
    normformer.add_argument(
        "--normformer", dest="normformer", action="store_true", default=None, help="force NormFormer layers on"
    )
    normformer.add_argument(
        "--no-normformer",
        dest="normformer",
        action="store_false",
        help="force them off (checkpoints trained without --scale-attn/--scale-fc/--scale-heads)",
    )
    parser.add_argument(
        "--ignore-cfg", action="store_true", help="ignore the checkpoint's cfg/config.json; use tensor shapes only"
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="keep a fresh initialisation for keys the checkpoint lacks"
    )
    parser.add_argument("--strict", action="store_true", help="fail on unexpected keys instead of leaving them out")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="dtype of the saved weights"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier import in OUT_DIR (only the files it wrote; a directory holding anything else is "
        "refused)",
    )
    return parser


def _print_summary(report: ImportReport) -> None:
    from biomedgpt.checkpoint.importer import REPORT_NAME

    config = report.config
    size = report.size_guess or "custom"
    print(f"imported {report.source} ({report.layout}, {report.weights}) -> {report.output}")
    print(
        f"  model: {size}: d_model={config.get('d_model')} layers={config.get('encoder_layers')}/"
        f"{config.get('decoder_layers')} heads={config.get('encoder_attention_heads')} "
        f"ffn={config.get('encoder_ffn_dim')} {config.get('resnet_type')} normformer={config.get('normformer')} "
        f"vocab={config.get('vocab_size')}; {report.parameters:,} parameters, saved as {report.output_dtype}"
    )
    print(f"  keys: {report.renamed} renamed, {len(report.dropped)} dropped (rebuilt buffers, tied copies)")
    if report.unexpected:
        print(f"  unexpected (left out): {', '.join(report.unexpected)}")
    if report.missing:
        print(f"  missing (freshly initialised): {', '.join(report.missing)}")
    tokenizer = report.tokenizer
    if tokenizer.get("written"):
        print(f"  tokenizer: from {tokenizer['origin']}, {tokenizer['vocab_size']} ids")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    print(f"  report: {report.output}/{REPORT_NAME}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from biomedgpt.checkpoint.importer import import_checkpoint

    try:
        report = import_checkpoint(
            args.source,
            args.out_dir,
            ema=args.ema,
            bpe_dir=args.bpe_dir,
            size=args.size,
            normformer=args.normformer,
            ignore_cfg=args.ignore_cfg,
            allow_missing=args.allow_missing,
            strict=args.strict,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (OutputDirError, OSError) as exc:  # a usage error or the output side (disk full, permissions)
        print(f"biomedgpt-import: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointImportError as exc:
        print(f"biomedgpt-import: error: {exc}", file=sys.stderr)
        return 1
    _print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
