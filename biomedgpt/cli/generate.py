"""``biomedgpt-generate --model DIR --image FILE --prompt TEXT``: answer one prompt about one image (or a batch).

Examples::

    biomedgpt-generate --model models/cap --image scan.dcm --prompt "what does the image describe?"
    biomedgpt-generate --model models/vqa --image xray.png --prompt "is there a fracture?" --answers yes,no
    biomedgpt-generate --model models/cap --batch requests.jsonl --out answers.jsonl

Images may be PNG, JPEG or DICOM. The prompt is lowercased and gets a leading space, as the original prompts
(``" what does the image describe?"``). ``--answers`` restricts the output to the listed answers (trie-constrained
beam search, unnormalized scores). A fine-tuned model directory (with ``finetune_task.json``) sets the defaults: its
image size, normalisation and candidate answers, and for VQA the question as decoder prefix, as it was trained.
Batch lines are ``{"image": PATH, "prompt": TEXT}``; the output lines add
``"output"``. Exit status: 0 success, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "biomedgpt-generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text for an image and a prompt with a BiomedGPT model directory.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json + tokenizer)")
    parser.add_argument("--image", help="image file (PNG, JPEG or DICOM)")
    parser.add_argument("--prompt", help="prompt text, e.g. 'what does the image describe?'")
    parser.add_argument("--batch", help='JSONL file of {"image": path, "prompt": text} lines')
    parser.add_argument("--out", help="batch mode: write JSONL here instead of stdout")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    parser.add_argument("--max-len-b", type=int, default=16, help="max generated tokens (default 16)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3, help="free decoding: n-gram blocking (3)")
    parser.add_argument("--answers", help="comma-separated answers to constrain the output to, e.g. yes,no")
    parser.add_argument(
        "--image-size", type=int, default=None, help="patch image size (default: the model's fine-tuning one, else 256)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def format_prompt(prompt: str) -> str:
    """Lowercased with one leading space, as the original task prompts."""
    return " " + " ".join(prompt.strip().lower().split())


class Generator:
    """A loaded model + tokenizer answering (image, prompt) pairs."""

    def __init__(
        self,
        model_dir: str,
        *,
        beam: int = 5,
        max_len_b: int = 16,
        no_repeat_ngram_size: int = 3,
        answers: list[str] | None = None,
        image_size: int | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        from biomedgpt.data.finetune_tasks import IMAGENET_MEAN, IMAGENET_STD, read_task_file
        from biomedgpt.data.images import DEFAULT_MEAN, DEFAULT_STD
        from biomedgpt.model import BiomedGPTForConditionalGeneration, DecodingConfig, Trie
        from biomedgpt.tokenizer import BiomedGPTTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = BiomedGPTTokenizer.from_pretrained(model_dir)
        self.model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).to(self.device).eval()
        recorded = read_task_file(model_dir) or {}
        self.task = recorded.get("task")
        self.image_size = image_size or int(recorded.get("patch_image_size") or 256)
        imagenet = bool(recorded.get("imagenet_normalization"))
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (DEFAULT_MEAN, DEFAULT_STD)
        answers = answers or recorded.get("answers")
        if answers:
            trie = Trie.from_answers(answers, self.tokenizer)
            self.decoding = DecodingConfig(
                beam_size=beam, max_len_b=max_len_b, constraint_trie=trie, normalize_scores=False
            )
        else:
            self.decoding = DecodingConfig(
                beam_size=beam, max_len_b=max_len_b, no_repeat_ngram_size=no_repeat_ngram_size
            )

    def __call__(self, image_path: str | Path, prompt: str) -> str:
        import torch

        from biomedgpt.data.examples import normalize_text
        from biomedgpt.data.images import image_to_tensor, load_image
        from biomedgpt.model import generate

        tok = self.tokenizer
        image = image_to_tensor(load_image(image_path), self.image_size, self.mean, self.std)[None].to(self.device)
        if self.task == "vqa":  # the question as VQA fine-tuning wrote it: cleaned, with a question mark
            question = normalize_text(prompt)
            prompt_ids = tok.encode(" " + (question if question.endswith("?") else question + "?"))
        else:
            prompt_ids = tok.encode(format_prompt(prompt))
        input_ids = torch.tensor([[tok.bos_id, *prompt_ids, tok.eos_id]], dtype=torch.long, device=self.device)
        masks = torch.ones(1, dtype=torch.bool, device=self.device)
        # A VQA fine-tune reads the question on the decoder side too (prompt_type prev_output) and answers after it.
        prefix = [prompt_ids] if self.task == "vqa" else None
        hyps = generate(
            self.model, input_ids, patch_images=image, patch_masks=masks, config=self.decoding, prefix_tokens=prefix
        )[0]
        return tok.decode(hyps[0].generated_tokens).strip() if hyps else ""


def _read_batch(path: str) -> list[dict[str, Any]]:
    items = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from error
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or "prompt" not in item:
                raise ValueError(f'{path}:{number}: expected {{"image": path, "prompt": text}}')
            items.append(item)
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    if args.batch is None and (args.image is None or args.prompt is None):
        return fail("give --image and --prompt, or --batch FILE.jsonl")
    if args.batch is not None and (args.image is not None or args.prompt is not None):
        return fail("--batch cannot be combined with --image/--prompt")
    if (
        args.beam < 1
        or args.max_len_b < 1
        or (args.image_size is not None and (args.image_size < 16 or args.image_size % 16))
    ):
        return fail("--beam and --max-len-b must be >= 1, --image-size a positive multiple of 16")
    answers = [a.strip() for a in args.answers.split(",") if a.strip()] if args.answers else None
    if args.answers is not None and not answers:
        return fail("--answers has no answers")
    if not Path(args.model, "config.json").is_file():
        return fail(f"{args.model}: not a model directory (no config.json)")
    try:
        items = _read_batch(args.batch) if args.batch else [{"image": args.image, "prompt": args.prompt}]
        generator = Generator(
            args.model,
            beam=args.beam,
            max_len_b=args.max_len_b,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            answers=answers,
            image_size=args.image_size,
            device=args.device,
        )
        results = [{**item, "output": generator(item["image"], str(item["prompt"]))} for item in items]
    except (OSError, ValueError) as error:
        return fail(str(error))

    if args.batch is None:
        print(results[0]["output"])
        return 0
    lines = "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results)
    if args.out:
        Path(args.out).write_text(lines)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
