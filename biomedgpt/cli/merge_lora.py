"""``biomedgpt-merge-lora IN_DIR OUT_DIR``: a consolidated vision_chat model with LoRA adapters -> the merged model.

Examples::

    biomedgpt-consolidate checkpoints/instruct models/instruct-lora        # adapters kept unmerged
    biomedgpt-merge-lora models/instruct-lora models/instruct --adapter-out models/instruct-adapter

OUT_DIR is what transformers' LlavaForConditionalGeneration loads (and ``model.init_from`` trains further);
``--adapter-out`` also writes the adapters as PEFT saves them and the projector as ``non_lora_trainables.safetensors``.
Exit status: 0 success, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "biomedgpt-merge-lora"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="IN_DIR", help="biomedgpt-consolidate output of a run with model.lora")
    parser.add_argument("output_dir", metavar="OUT_DIR", help="where the merged model goes")
    parser.add_argument("--adapter-out", metavar="DIR", help="also write the PEFT adapter directory here")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool")
    args = parser.parse_args(argv)
    from biomedgpt.checkpoint.errors import ConsolidationError
    from biomedgpt.checkpoint.merge_lora import merge_lora

    try:
        result = merge_lora(args.model_dir, args.output_dir, args.adapter_out, overwrite=args.overwrite)
    except (ConsolidationError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
