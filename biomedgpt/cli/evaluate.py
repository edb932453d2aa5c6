"""``biomedgpt-eval --model DIR --task TASK --data DIR``: decode a converted dataset and report the task's metrics.

Examples::

    biomedgpt-eval --model models/vqa --task vqa --data converted/vqa_test \\
        --answers corpus/vqa_ans2label.json --answer-types corpus/vqa_answer_types.json
    biomedgpt-eval --model models/cap --task caption --data converted/caption_test --beam 5 --max-len-b 16
    biomedgpt-eval --model models/nli --task nli --data converted/nli_test --tracking-uri sqlite:///mlruns.db
    biomedgpt-eval --model models/biomedgpt-lm-7b --task pubmedqa --data pubmedqa_test.jsonl
    biomedgpt-eval --model models/vlm-merged --task vqa_dialogue --data converted/vqa_rad_dialogue_test --beam 3

Tasks pubmedqa and medmcqa evaluate a Hugging Face causal LM directory (AutoModelForCausalLM) on a JSONL file by
candidate log-likelihood: see :mod:`biomedgpt.evaluation.multiple_choice` for the layouts. Task vqa_dialogue
evaluates a vision-language chat model directory (a consolidated or merged ``vision_chat`` run) on conversation
shards (``biomedgpt-convert --kind conversations``) by generation: every assistant turn is a question, scored as
VQA (closed/open accuracy) and by ROUGE, beside the majority-answer baseline; see
:mod:`biomedgpt.evaluation.chat_answers`.

Decoding follows the original evaluation scripts (BiomedGPT scripts/*/evaluate_*.sh); see
:mod:`biomedgpt.evaluation.runner`. Writes ``OUT/predictions.jsonl`` and ``OUT/metrics.json``. Exit status:
0 success, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from biomedgpt.tasks import FINETUNE_TASK_NAMES

PROG = "biomedgpt-eval"
# The layouts of biomedgpt.evaluation.multiple_choice (spelt out: that module imports torch, --help must not wait).
MULTIPLE_CHOICE_TASKS = ("pubmedqa", "medmcqa")
CHAT_TASK = "vqa_dialogue"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a BiomedGPT model directory on a converted fine-tuning dataset.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json + tokenizer)")
    parser.add_argument(
        "--task",
        required=True,
        choices=[*FINETUNE_TASK_NAMES, *MULTIPLE_CHOICE_TASKS, CHAT_TASK],
        help="a BiomedGPT fine-tuning task, pubmedqa / medmcqa for a causal LM, vqa_dialogue for a vision chat model",
    )
    parser.add_argument(
        "--data", required=True, help="converted dataset directory (index.json + Parquet shards); JSONL for MC tasks"
    )
    parser.add_argument("--out", default=None, help="output directory (default: eval_<task>)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    parser.add_argument(
        "--beam", type=int, default=None, help="beam size (default: the task's, VQA and vqa_dialogue 1, else 5)"
    )
    parser.add_argument(
        "--max-len-b", type=int, default=None, help="max generated length (default: the task's, vqa_dialogue 32)"
    )
    parser.add_argument(
        "--template", default=None, help="vqa_dialogue: chat template (default: the one recorded at training)"
    )
    parser.add_argument("--system", default=None, help="vqa_dialogue: system prompt (default: the recorded one)")
    parser.add_argument(
        "--answers",
        default=None,
        help="candidate answers / class names: JSON list or dict answer -> index (default: those the model was "
        "fine-tuned with, else every answer in the data)",
    )
    parser.add_argument("--answer-types", default=None, help="VQA: JSON question_id -> CLOSED/OPEN")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="patch image size (default: the fine-tuning one recorded in the model directory, else 256)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI: log metrics and files to a new run")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default biomedgpt-eval)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    console = Console()
    err = Console(stderr=True)
    for name in ("batch_size", "beam", "max_len_b", "image_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            err.print(f"[red]{PROG}: --{name.replace('_', '-')} must be >= 1, got {value}[/red]")
            return 2

    import torch

    from biomedgpt.evaluation.runner import EvaluationError, evaluate, load_answer_list, load_answer_types

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or f"eval_{args.task}"
    if args.task in MULTIPLE_CHOICE_TASKS:
        from biomedgpt.evaluation.multiple_choice import MultipleChoiceError, evaluate_multiple_choice

        try:
            metrics = evaluate_multiple_choice(
                args.model, args.task, args.data, out, batch_size=args.batch_size, limit=args.limit, device=device,
                progress=not args.no_progress,
            )  # fmt: skip
        except (MultipleChoiceError, OSError) as error:
            err.print(f"[red]{PROG}: {error}[/red]", soft_wrap=True)
            return 2
        console.print(
            f"{args.task}: accuracy {metrics['accuracy']:.4f} on {metrics['count']} questions (chance "
            f"{metrics['chance']:.2f}); rejected {metrics['rejected'] or 'none'}; {out}/predictions.jsonl",
            soft_wrap=True,
        )
        return 0
    if args.task == CHAT_TASK:
        return _evaluate_dialogue(args, out, device, console, err)
    if args.template is not None or args.system is not None:
        err.print(f"[red]{PROG}: --template and --system apply to --task {CHAT_TASK} only[/red]")
        return 2
    try:
        answers = load_answer_list(args.answers) if args.answers else None
        answer_types = load_answer_types(args.answer_types) if args.answer_types else None
        metrics = evaluate(
            args.model,
            args.task,
            args.data,
            out,
            batch_size=args.batch_size,
            beam=args.beam,
            max_len_b=args.max_len_b,
            answers=answers,
            answer_types=answer_types,
            limit=args.limit,
            device=device,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            image_size=args.image_size,
            progress=not args.no_progress,
        )
    except (EvaluationError, ValueError, FileNotFoundError) as error:
        err.print(f"[red]{PROG}: {error}[/red]", soft_wrap=True)
        return 2

    _print_metrics(console, args, metrics, out)
    return 0


def _print_metrics(console: Any, args: argparse.Namespace, metrics: dict[str, Any], out: str) -> None:
    from rich.table import Table

    table = Table(title=f"{args.task} on {args.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _format(value))
    console.print(table)
    console.print(f"predictions and metrics: {out}/predictions.jsonl, {out}/metrics.json", soft_wrap=True)


def _evaluate_dialogue(args: argparse.Namespace, out: str, device: str, console: Any, err: Any) -> int:
    from biomedgpt.data.chat_templates import CHAT_TEMPLATES, ChatTemplateError
    from biomedgpt.evaluation.chat_answers import evaluate_vqa_dialogue
    from biomedgpt.evaluation.runner import load_answer_types

    if args.answers is not None or args.image_size is not None:
        err.print(f"[red]{PROG}: --answers and --image-size do not apply to {CHAT_TASK} (free generation; the "
                  "model's own image processor)[/red]")  # fmt: skip
        return 2
    if args.template is not None and args.template not in CHAT_TEMPLATES:
        err.print(f"[red]{PROG}: --template {args.template!r}: choose one of {', '.join(CHAT_TEMPLATES)}[/red]")
        return 2
    try:
        answer_types = load_answer_types(args.answer_types) if args.answer_types else None
        metrics = evaluate_vqa_dialogue(
            args.model, args.data, out, answer_types=answer_types, batch_size=args.batch_size, limit=args.limit,
            progress=not args.no_progress, template=args.template, system=args.system, beam=args.beam or 1,
            max_new_tokens=args.max_len_b or 32, device=device,
        )  # fmt: skip
    except (ChatTemplateError, ValueError, OSError) as error:
        err.print(f"[red]{PROG}: {error}[/red]", soft_wrap=True)
        return 2
    _print_metrics(console, args, metrics, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
