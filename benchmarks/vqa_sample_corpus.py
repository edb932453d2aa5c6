"""Fine-tuned VQA accuracy on the learnable sample corpus against the answer-prior baselines, in one run.

    .venv/bin/python benchmarks/vqa_sample_corpus.py                       # defaults below, ~30 min on 2 CPU cores
    .venv/bin/python benchmarks/vqa_sample_corpus.py --rows 256 --steps 300  # a quicker look

Writes the sample corpus (``--rows`` VQA training questions, a quarter as many validation and test questions, 64x64
images), converts it, fine-tunes the tiny model from scratch with the ``finetune_vqa`` preset (trie-constrained
training, EMA, validation keeping the best model) on ``--nproc`` CPU ranks, evaluates the best model on the test
split with ``biomedgpt-eval``'s code and compares it with the majority-answer and question-prior baselines.
Results: ``OUT/results.json``, ``OUT/results.md`` and ``OUT/vqa_sample_corpus.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from biomedgpt.data.convert import convert
from biomedgpt.data.sample_corpus import write_sample_corpus
from biomedgpt.evaluation.baselines import majority_answer_baseline, question_prior_baseline
from biomedgpt.evaluation.runner import evaluate, iter_rows, load_answer_types
from biomedgpt.train.cli import torchrun_command

IMAGE_SIZE = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/vqa_sample_corpus"))
    parser.add_argument("--rows", type=int, default=1024, help="VQA training questions (default 1024)")
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps (default 700)")
    parser.add_argument("--batch", type=int, default=32, help="global batch size (default 32)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4, from scratch)")
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prepare(out: Path, rows: int, seed: int) -> Path:
    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        write_sample_corpus(corpus, rows=rows, seed=seed, image_size=IMAGE_SIZE)
    for split in ("train", "val", "test"):
        target = out / "converted" / f"vqa_{split}"
        if not (target / "index.json").is_file():
            summary = convert(str(corpus / f"vqa_{split}.tsv"), "vqa", str(target), overwrite=True)
            if summary.rows_rejected:
                raise SystemExit(f"vqa_{split}: {summary.rows_rejected} rows rejected, see {target}/rejects.jsonl")
    return corpus


def fine_tune(args: argparse.Namespace, corpus: Path) -> Path:
    out, converted = args.out, args.out / "converted"
    micro = max(1, args.batch // (args.nproc * 2))
    overrides = [
        "model.size=tiny", "model.init_from=null", "data.tokenizer=null", "model.freeze_embedding=false",
        "data.allow_demo_tokenizer=true",  # the sample corpus's own small tokenizer, not the published vocabulary
        f"data.train={converted / 'vqa_train'}", f"data.answers={corpus / 'vqa_ans2label.json'}",
        f"data.patch_image_size={IMAGE_SIZE}", f"data.seed={args.seed}", f"seed={args.seed}",
        "precision=fp32", "deepspeed_config=zero3_cpu.json",
        f"optim.lr={args.lr}", f"optim.max_steps={args.steps}", "optim.warmup_ratio=0.04",
        f"batch.global_batch_size={args.batch}", f"batch.micro_batch_size={micro}",
        f"ema.decay={args.ema_decay}",
        f"validation.data={converted / 'vqa_val'}", f"validation.every_steps={args.validate_every}",
        f"validation.answer_types={corpus / 'vqa_answer_types.json'}", "validation.batch_size=32",
        f"checkpoint.dir={out / 'ckpt'}", f"checkpoint.every_steps={args.validate_every}", "checkpoint.keep_last=1",
        "tracking.experiment=vqa-sample-corpus", "tracking.system_metrics=false", "log_every_steps=10",
    ]  # fmt: skip
    command = torchrun_command("finetune_vqa", overrides, args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out.resolve() / 'mlruns.db'}")
    subprocess.run(command, env=env, check=True)  # resumes from its checkpoints when re-run
    return out / "ckpt"


def plot(records: list[dict], baselines: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "val/accuracy" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("val/accuracy", "overall"), ("val/closed_accuracy", "closed"), ("val/open_accuracy", "open")):
        left.plot(steps, [r[key] for r in records if "val/accuracy" in r], marker="o", ms=3, label=f"{label} (EMA)")
    for name, value in baselines.items():
        left.axhline(value, linestyle="--", linewidth=1, color="grey" if "majority" in name else "black", label=name)
    left.set(xlabel="step", ylabel="validation accuracy", title="VQA accuracy on the sample corpus", ylim=(0, 1))
    left.legend(fontsize=8)
    train = [r for r in records if "loss" in r]
    right.plot([r["step"] for r in train], [r["loss"] for r in train])
    right.set(xlabel="step", ylabel="training loss (per answer token)", title="training loss", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = prepare(args.out, args.rows, args.seed)
    converted = args.out / "converted"
    answer_types = load_answer_types(corpus / "vqa_answer_types.json")
    train_rows = list(iter_rows(converted / "vqa_train"))
    baselines = {}
    for split in ("val", "test"):
        rows = list(iter_rows(converted / f"vqa_{split}"))
        baselines[split] = {
            "majority": majority_answer_baseline(train_rows, rows, answer_types),
            "question_prior": question_prior_baseline(train_rows, rows, answer_types),
        }
    checkpoint_dir = fine_tune(args, corpus)
    best = checkpoint_dir / "best"
    test = evaluate(
        best, "vqa", converted / "vqa_test", args.out / "eval_test", answer_types=answer_types, batch_size=32
    )
    validation = json.loads((best / "validation_metrics.json").read_text())
    records = [json.loads(x) for x in (checkpoint_dir / "metrics.jsonl").read_text().splitlines() if x]
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "rows": {"train": len(train_rows), "test": test["count"]},
        "best_step": validation["step"],
        "fine_tuned_test": {k: test[k] for k in ("accuracy", "closed_accuracy", "open_accuracy", "count")},
        "baselines_test": {
            name: {k: b[k] for k in ("accuracy", "closed_accuracy", "open_accuracy")}
            for name, b in baselines["test"].items()
        },
        "majority_answer": baselines["test"]["majority"]["answer"],
        "seconds": round(time.perf_counter() - started),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| test split | overall | closed (yes/no) | open |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['accuracy']:.3f} | {r['closed_accuracy']:.3f} | {r['open_accuracy']:.3f} |"
            for name, r in [
                ("majority answer baseline", results["baselines_test"]["majority"]),
                ("question-prior baseline", results["baselines_test"]["question_prior"]),
                (f"fine-tuned tiny model (best step {validation['step']})", results["fine_tuned_test"]),
            ]
        ),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    val_baselines = {
        "majority baseline (val)": baselines["val"]["majority"]["accuracy"],
        "question-prior baseline (val)": baselines["val"]["question_prior"]["accuracy"],
    }
    plot(records, val_baselines, args.out / "vqa_sample_corpus.png")
    print("\n".join(lines))
    print(f"results in {args.out}/results.json, results.md, vqa_sample_corpus.png ({results['seconds']} s)")


if __name__ == "__main__":
    main()
