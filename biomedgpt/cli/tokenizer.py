"""``biomedgpt-tokenizer``: train, inspect and try out BiomedGPT tokenizers.

Examples::

    biomedgpt-tokenizer train --input captions.txt --input vqa.tsv --tsv-column 2 --vocab-size 8000 --out tok/
    biomedgpt-tokenizer encode --tokenizer tok/ " what does the image describe?"
    biomedgpt-tokenizer encode --no-bpe "<bin_3> <bin_900>"
    biomedgpt-tokenizer decode --tokenizer tok/ 0 281 1004 2
    biomedgpt-tokenizer info --tokenizer tok/

``--tokenizer`` accepts a ``save_pretrained`` directory, a directory holding the original GPT-2 files
(``encoder.json``, ``vocab.bpe``, ``dict.txt``) or a ``.model`` file; without it the shipped demo model is
used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from biomedgpt.tokenizer import (
    DEFAULT_NUM_BINS,
    DEFAULT_NUM_CODES,
    BiomedGPTTokenizer,
    load_default_tokenizer,
    train_sentencepiece,
)


def _load(path: str | None) -> BiomedGPTTokenizer:
    return load_default_tokenizer() if path is None else BiomedGPTTokenizer.from_pretrained(path)


def _cmd_train(args: argparse.Namespace) -> int:
    tok = train_sentencepiece(
        args.input,
        args.out,
        args.vocab_size,
        tsv_column=args.tsv_column,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        prefix_space=not args.no_prefix_space,
        max_sentences=args.max_sentences,
        num_codes=args.num_codes,
        num_bins=args.num_bins,
        verbose=args.verbose,
    )
    print(f"saved {tok!r} to {args.out}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer)
    ids = tok.encode(args.text, use_bpe=not args.no_bpe)
    if args.add_bos_eos:
        ids = [tok.bos_id, *ids, tok.eos_id]
    tokens = tok.convert_ids_to_tokens(ids)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": tokens}, ensure_ascii=False))
    else:
        print("ids:    " + " ".join(map(str, ids)))
        print("tokens: " + " ".join(tokens))
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer)
    print(tok.decode(args.ids, skip_special_tokens=not args.keep_special))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer)
    lo, hi = tok.random_replacement_range
    rows = [
        ("kind", tok.kind),
        ("vocab_size", tok.vocab_size),
        ("specials", f"{tok.bos_id}=<s> {tok.pad_id}=<pad> {tok.eos_id}=</s> {tok.unk_id}=<unk>"),
        ("text tokens", f"{tok.num_text_tokens} (ids 4..{tok.mask_id - 1})"),
        ("<mask>", tok.mask_id),
        ("codes", f"{tok.num_codes} (<code_0>={tok.code_offset} .. {tok.bin_offset - 1})"),
        ("bins", f"{tok.num_bins} (<bin_0>={tok.bin_offset} .. {tok.vocab_size - 1})"),
        ("random replacement", f"[{lo}, {hi})"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with the ``train``/``encode``/``decode``/``info`` subcommands."""
    p = argparse.ArgumentParser(prog="biomedgpt-tokenizer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a SentencePiece tokenizer with the BiomedGPT id layout")
    t.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="FILE",
        help="text file (one sentence per line) or .tsv file; repeat for several",
    )
    t.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="SentencePiece pieces incl. 4 specials and 256 byte pieces (mask/codes/bins come on top)",
    )
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--tsv-column", type=int, default=None, metavar="K", help="0-based text column of .tsv inputs")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument(
        "--no-prefix-space",
        action="store_true",
        help="train on lines as-is instead of ' ' + line (BiomedGPT texts start with a space)",
    )
    t.add_argument("--max-sentences", type=int, default=0, help="sample this many lines (0 = all)")
    t.add_argument("--num-codes", type=int, default=DEFAULT_NUM_CODES, help=argparse.SUPPRESS)
    t.add_argument("--num-bins", type=int, default=DEFAULT_NUM_BINS, help=argparse.SUPPRESS)
    t.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    t.set_defaults(func=_cmd_train)

    tok_help = "tokenizer directory or .model file (default: the shipped demo tokenizer)"
    e = sub.add_parser("encode", help="print ids and tokens of a text")
    e.add_argument("text")
    e.add_argument("--tokenizer", default=None, metavar="DIR", help=tok_help)
    e.add_argument("--no-bpe", action="store_true", help="look whitespace-separated symbols up verbatim")
    e.add_argument("--add-bos-eos", action="store_true")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_encode)

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("ids", type=int, nargs="+")
    d.add_argument("--tokenizer", default=None, metavar="DIR", help=tok_help)
    d.add_argument("--keep-special", action="store_true", help="keep <s>, <pad>, </s>")
    d.set_defaults(func=_cmd_decode)

    i = sub.add_parser("info", help="print the id layout")
    i.add_argument("--tokenizer", default=None, metavar="DIR", help=tok_help)
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns 0 on success, 2 on user errors (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"biomedgpt-tokenizer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
