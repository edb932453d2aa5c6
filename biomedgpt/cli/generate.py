"""``biomedgpt-generate --model DIR --image FILE --prompt TEXT``: answer one prompt about one image (or a batch).

Examples::

    biomedgpt-generate --model models/cap --image scan.dcm --prompt "what does the image describe?"
    biomedgpt-generate --model models/vqa --image xray.png --prompt "is there a fracture?" --answers yes,no
    biomedgpt-generate --model models/cap --batch requests.jsonl --out answers.jsonl
    biomedgpt-generate --model models/vlm-merged --image ct.dcm --prompt "Which organ is shown?" --beam 1

A vision-language chat model directory (a consolidated or merged ``vision_chat`` run, ``model_type`` llava) answers
the prompt as the first user turn of a conversation (``<image>`` placed before the question unless the prompt has
it) in the chat template it was trained with (``--template``/``--system`` override), up to ``--max-len-b`` new
tokens; the other options below apply to BiomedGPT directories.

Images may be PNG, JPEG or DICOM. The prompt is lowercased and gets a leading space, as the original prompts
(``" what does the image describe?"``). ``--answers`` restricts the output to the listed answers (trie-constrained
beam search, unnormalized scores). A fine-tuned model directory (with ``finetune_task.json``) sets the defaults: its
image size, normalisation and candidate answers, and for VQA the question as decoder prefix, as it was trained.
Batch lines are ``{"image": PATH, "prompt": TEXT}`` (relative image paths are read from the working directory);
each gives one output line, in order, that adds ``"output"``. A line that cannot be answered (a missing or
unreadable image, not a JSON request) is reported on stderr as FILE:LINE, the others still run, and its output line
gets ``"line"``, ``"output": null`` and ``"error"``. Exit status: 0 success, 1 some batch lines failed (with a
count), 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

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
    parser.add_argument("--template", default=None, help="chat model: chat template (default: the trained one)")
    parser.add_argument("--system", default=None, help="chat model: system prompt (default: the trained one)")
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


class BatchLine(NamedTuple):
    """One non-empty line of a batch file: its request, or why it is not one."""

    number: int
    item: dict[str, Any] | None
    error: str | None


def _read_batch(path: str) -> list[BatchLine]:
    """Every non-empty line of a JSONL batch; a malformed line is kept with its error (the others still run)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                lines.append(BatchLine(number, None, f"{path}:{number}: not JSON ({error})"))
                continue
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("image"), str)
                or not isinstance(item.get("prompt"), str)
            ):
                expected = f'{path}:{number}: expected {{"image": path, "prompt": text}}, got {line.strip()[:80]}'
                lines.append(BatchLine(number, item if isinstance(item, dict) else None, expected))
                continue
            lines.append(BatchLine(number, item, None))
    return lines


def _image_error(path: str, number: int, image: str, error: Exception) -> str:
    message = f"{path}:{number}: {error}"
    if isinstance(error, FileNotFoundError) and not Path(image).is_absolute():
        # batch paths are read from where the command runs, not beside the batch file
        message += f" (relative to the working directory {Path.cwd()})"
    return message


def _model_type(model_dir: str) -> str | None:
    try:
        return json.loads(Path(model_dir, "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # the model's own loader reports what is wrong with it


def _chat_generator(args: argparse.Namespace) -> Callable[[str, str], str]:
    from biomedgpt.evaluation.chat_answers import ChatAnswerer

    answerer = ChatAnswerer(
        args.model, template=args.template, system=args.system, beam=args.beam, max_new_tokens=args.max_len_b,
        device=args.device,
    )  # fmt: skip
    return answerer.ask


def _run_batch(generator: Callable[[str, str], str], lines: Sequence[BatchLine], batch: str, out: TextIO) -> int:
    """Answer every line, writing one output line each as it is done; returns how many failed."""
    failed = 0
    for line in lines:
        error = line.error
        record: dict[str, Any] = dict(line.item or {})
        if error is None:
            try:
                record["output"] = generator(record["image"], record["prompt"])
            except (OSError, ValueError) as exc:  # a missing or unreadable image spoils this line only
                error = _image_error(batch, line.number, record["image"], exc)
        if error is not None:
            failed += 1
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
            record.update(line=line.number, output=None, error=error)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()  # what is done survives a crash later in the batch
    return failed


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
        lines = _read_batch(args.batch) if args.batch else None
    except (OSError, UnicodeDecodeError) as error:
        return fail(f"cannot read the batch file {args.batch}: {error}")
    if lines is not None and not lines:
        return fail(f"{args.batch}: no requests (expected one JSON object per line)")
    chat = _model_type(args.model) == "llava"
    if chat and (answers or args.image_size is not None):
        return fail("--answers and --image-size apply to BiomedGPT models; a chat model generates freely")
    if not chat and (args.template is not None or args.system is not None):
        return fail("--template and --system apply to vision-language chat models (model_type llava)")
    try:
        generator: Callable[[str, str], str]
        if chat:
            generator = _chat_generator(args)
        else:
            generator = Generator(
                args.model,
                beam=args.beam,
                max_len_b=args.max_len_b,
                no_repeat_ngram_size=args.no_repeat_ngram_size,
                answers=answers,
                image_size=args.image_size,
                device=args.device,
            )
        if lines is None:
            print(generator(args.image, args.prompt))
            return 0
        with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as out:
            failed = _run_batch(generator, lines, args.batch, out)
    except (OSError, ValueError) as error:
        return fail(str(error))
    if failed:
        where = args.out or "the output"
        print(
            f'{PROG}: {failed} of {len(lines)} batch lines failed; their lines in {where} have an "error" field',
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
