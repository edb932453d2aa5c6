"""End-to-end demo on a CPU: sample corpus -> Parquet shards -> ZeRO-3 pretraining on 2 ranks -> MLflow.

Run with ``make demo`` (or ``python -m biomedgpt.demo [--out DIR] [--steps N]``). Steps:
1. a tour of the model: a freshly initialised tiny model reads real CT and MR slices and writes (random) words
   with beam search, answer-constrained decoding and all-candidate scoring, then survives a save/load round trip;
2. the sample corpus in BiomedGPT's TSV formats, converted to Parquet shards for mosaicml-streaming;
3. pretraining of the tiny model with DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), logged to MLflow (``mlruns.db``);
4. where the checkpoint and the MLflow run are, the checkpoint consolidated into a Hugging Face directory
   (``demo_out/model``);
5. VQA fine-tuning from that directory (``finetune_vqa`` preset: trie-constrained answers, EMA, validation keeping
   the best model in ``demo_out/finetune_vqa/best``), then ``biomedgpt-eval`` of the best model on the test split,
   and what to run next.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pydicom.data
import torch
from rich.console import Console
from rich.table import Table

from biomedgpt.data.images import image_to_tensor, load_image
from biomedgpt.model import (
    BiomedGPTConfig,
    BiomedGPTForConditionalGeneration,
    DecodingConfig,
    Trie,
    count_trainable_parameters,
    generate,
    score_candidates,
)
from biomedgpt.output_dirs import OutputDirError, claim_output_dir
from biomedgpt.tasks import FINETUNE_TASK_NAMES
from biomedgpt.tokenizer import BiomedGPTTokenizer

IMAGE_SIZE = 256
# What the demo writes in its --out folder (and replaces on a re-run); the staging folders are the checkpoint tools'.
DEMO_ENTRIES = ("checkpoints", "converted", "corpus", "eval_vqa", "finetune_vqa", "model", "untrained_model")
PROMPTS = [" what does the image describe?", " is there a lesion in the image?"]


def model_tour(out_dir: Path, console: Console) -> Path:
    torch.manual_seed(0)
    tokenizer = BiomedGPTTokenizer.default()
    console.print(f"[bold]Tokenizer[/bold]: {tokenizer!r}")

    config = BiomedGPTConfig.for_size("tiny", vocab_size=len(tokenizer))
    model = BiomedGPTForConditionalGeneration(config).eval()
    console.print(f"[bold]Model[/bold]: BiomedGPT tiny, {count_trainable_parameters(model):,} trainable parameters")

    scans = {name: pydicom.data.get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm")}
    images = torch.stack([image_to_tensor(load_image(path), IMAGE_SIZE) for path in scans.values()])
    masks = torch.ones(len(scans), dtype=torch.bool)
    input_ids = tokenizer.encode_batch([PROMPTS[0]] * len(scans), return_tensors="pt")

    started = time.perf_counter()
    captions = generate(
        model,
        input_ids,
        patch_images=images,
        patch_masks=masks,
        config=DecodingConfig(beam_size=5, max_len_b=16, no_repeat_ngram_size=3),
    )
    caption_seconds = time.perf_counter() - started

    question_ids = tokenizer.encode_batch([PROMPTS[1]] * len(scans), return_tensors="pt")
    answers = ["yes", "no"]
    trie = Trie.from_answers(answers, tokenizer)
    constrained = generate(
        model,
        question_ids,
        patch_images=images,
        patch_masks=masks,
        config=DecodingConfig(beam_size=2, max_len_b=8, constraint_trie=trie, normalize_scores=False),
    )
    candidates = [tokenizer.encode(" " + answer) for answer in answers]
    scores = score_candidates(model, question_ids, candidates, patch_images=images, patch_masks=masks)

    table = Table(title=f"Untrained tiny model on real DICOM slices ({caption_seconds:.1f} s for beam-5 captions)")
    for column in ("image", "beam-5 caption (random weights)", "trie-constrained answer", "log p(yes) / log p(no)"):
        table.add_column(column)
    for row, name in enumerate(scans):
        table.add_row(
            name,
            repr(tokenizer.decode(captions[row][0].tokens.tolist())),
            tokenizer.decode(constrained[row][0].tokens.tolist()).strip(),
            f"{scores[row, 0]:.2f} / {scores[row, 1]:.2f}",
        )
    console.print(table)

    model_dir = out_dir / "untrained_model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    reloaded = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        before = model(input_ids=input_ids, patch_images=images, patch_masks=masks, decoder_input_ids=input_ids)
        after = reloaded(input_ids=input_ids, patch_images=images, patch_masks=masks, decoder_input_ids=input_ids)
    if not torch.equal(before.logits, after.logits):
        raise RuntimeError("save/load round trip changed the logits")
    console.print(f"[green]Saved and reloaded[/green] {model_dir} (safetensors + tokenizer): identical logits.")
    return model_dir


PRETRAINING_KINDS = ("vision_language", "text", "image", "detection")
FINETUNE_KINDS = FINETUNE_TASK_NAMES  # each task has a TSV kind of its own name


def prepare_demo_data(root: Path, rows: int = 64, seed: int = 0, image_size: int = 96) -> dict[str, Path]:
    """Write the sample corpus under ``root/corpus`` and convert every file into ``root/converted/<name>``."""
    from biomedgpt.data.convert import convert
    from biomedgpt.data.sample_corpus import write_sample_corpus

    corpus = root / "corpus"
    write_sample_corpus(corpus, rows=rows, seed=seed, image_size=image_size)
    converted: dict[str, Path] = {}
    jobs = [(kind, kind) for kind in PRETRAINING_KINDS]
    jobs += [(kind, f"{kind}_{split}") for kind in FINETUNE_KINDS for split in ("train", "val", "test")]
    for kind, name in jobs:
        out = root / "converted" / name
        summary = convert(str(corpus / f"{name}.tsv"), kind, str(out), overwrite=True)
        if summary.rows_rejected:
            raise RuntimeError(f"{name}: {summary.rows_rejected} sample rows rejected; see {out}/rejects.jsonl")
        converted[name] = out
    return converted


def demo_overrides(root: Path, steps: int) -> list[str]:
    converted = root / "converted"
    overrides = [f"data.{kind}={converted / kind}" for kind in PRETRAINING_KINDS]
    return overrides + [
        f"data.negative_samples={root / 'corpus' / 'negative_sample'}",
        f"checkpoint.dir={root / 'checkpoints'}",
        f"optim.max_steps={steps}",
    ]


def finetune_overrides(root: Path, steps: int) -> list[str]:
    """The ``finetune_vqa`` preset shrunk to the demo: from the consolidated demo model, a few steps on 2 CPU ranks."""
    converted, corpus = root / "converted", root / "corpus"
    return [
        f"model.init_from={root / 'model'}", f"data.tokenizer={root / 'model'}", "model.size=tiny",
        f"data.train={converted / 'vqa_train'}", f"data.answers={corpus / 'vqa_ans2label.json'}",
        "data.patch_image_size=128", "precision=fp32", "deepspeed_config=zero3_cpu.json",
        "batch.global_batch_size=8", "batch.micro_batch_size=4", f"optim.max_steps={steps}", "optim.lr=1e-4",
        "ema.decay=0.9", f"validation.data={converted / 'vqa_val'}", f"validation.every_steps={max(1, steps // 2)}",
        f"validation.answer_types={corpus / 'vqa_answer_types.json'}", "validation.batch_size=16",
        f"checkpoint.dir={root / 'finetune_vqa'}", f"checkpoint.every_steps={steps}",
        "tracking.experiment=biomedgpt-demo", "tracking.run_name=demo-finetune-vqa", "log_every_steps=5",
    ]  # fmt: skip


def launch_training(root: Path, steps: int, console: Console, nproc: int = 2, finetune: bool = False) -> int:
    """torchrun with ``nproc`` CPU ranks running ``biomedgpt-train --config demo`` (or the demo's VQA fine-tune)."""
    import subprocess

    from biomedgpt.train.cli import torchrun_command

    if finetune:
        command = torchrun_command("finetune_vqa", finetune_overrides(root, steps), nproc)
    else:
        command = torchrun_command("demo", demo_overrides(root, steps), nproc)
    what = "Fine-tuning" if finetune else "Pretraining"
    console.print(f"[bold]{what}[/bold] (ZeRO-3, {nproc} CPU ranks): {' '.join(command[2:])}", soft_wrap=True)
    return subprocess.call(command)


def latest_run(experiment: str, tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder (default demo_out)")
    parser.add_argument("--steps", type=int, default=30, help="pretraining steps (default 30)")
    parser.add_argument("--finetune-steps", type=int, default=10, help="VQA fine-tuning steps (default 10)")
    parser.add_argument("--skip-tour", action="store_true", help="skip step 1 (the untrained model tour)")
    args = parser.parse_args(argv)
    console = Console()
    root = args.out.resolve()
    try:  # the demo replaces its own folders on a re-run: never those of a directory it did not make
        claim_output_dir(root, tool="biomedgpt-demo", owned=DEMO_ENTRIES)
    except OutputDirError as error:
        console.print(f"[red]{error}[/red]")
        return 2
    if not args.skip_tour:
        console.rule("1. the model")
        model_tour(root, console)
    console.rule("2. sample corpus -> Parquet shards")
    converted = prepare_demo_data(root)
    console.print(f"wrote {root / 'corpus'} and converted {len(converted)} files into {root / 'converted'}")
    console.rule("3. pretraining")
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # the demo starts fresh; real jobs resume
    code = launch_training(root, args.steps, console)
    if code != 0:
        console.print(f"[red]training failed with exit code {code}[/red]")
        return code
    console.rule("4. results")
    from biomedgpt.checkpoint.consolidate import consolidate_checkpoint
    from biomedgpt.tracking import default_tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    run = latest_run("biomedgpt-demo", uri)
    checkpoints = root / "checkpoints"
    console.print(f"checkpoints: {checkpoints} (latest: {(checkpoints / 'latest').read_text().strip()})")
    console.print(f"metrics log: {checkpoints / 'metrics.jsonl'}")
    if run is not None:
        loss = run.data.metrics.get("loss")
        console.print(f"MLflow run: {run.info.run_id} ({run.info.status}, final loss {loss:.4f}) in {uri}")
    consolidated = consolidate_checkpoint(checkpoints, root / "model", overwrite=True, progress=False)
    console.print(f"consolidated: {consolidated.summary()}", soft_wrap=True)

    console.rule("5. VQA fine-tuning and evaluation")
    shutil.rmtree(root / "finetune_vqa", ignore_errors=True)
    code = launch_training(root, args.finetune_steps, console, finetune=True)
    if code != 0:
        console.print(f"[red]fine-tuning failed with exit code {code}[/red]")
        return code
    from biomedgpt.evaluation.runner import evaluate, load_answer_types

    best = root / "finetune_vqa" / "best"
    metrics = evaluate(
        best, "vqa", root / "converted" / "vqa_test", root / "eval_vqa", tracking_uri=uri, progress=False,
        answer_types=load_answer_types(root / "corpus" / "vqa_answer_types.json"),
    )  # fmt: skip
    table = Table(title=f"biomedgpt-eval of {best} on the VQA test split ({metrics['count']} questions)")
    for column in ("overall", "closed", "open"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{metrics[key]:.3f}" for key in ("accuracy", "closed_accuracy", "open_accuracy")))
    console.print(table)
    console.print(f"predictions: {root / 'eval_vqa' / 'predictions.jsonl'} (a few steps: do not expect much)")
    console.print(
        "\nNext:\n"
        f"  mlflow ui --backend-store-uri {uri}   # browse the run\n"
        f"  biomedgpt-consolidate {args.out / 'checkpoints'} {args.out / 'model'} --overwrite --verify"
        "   # ZeRO shards -> Hugging Face directory\n"
        "  biomedgpt-compare demo-tiny --metrics loss lr --plot demo_out/loss.png   # runs side by side\n"
        f"  torchrun --nproc_per_node 2 -m biomedgpt.train --config demo {' '.join(demo_overrides(args.out, 60))}"
        "   # continue to 60 steps from the checkpoint\n"
        "  biomedgpt-train --config demo --dry-run   # resolved config, DeepSpeed config, memory estimate\n"
        f"  biomedgpt-generate --model {args.out / 'finetune_vqa' / 'best'} --image "
        f"{pydicom.data.get_testdata_file('CT_small.dcm')} --prompt 'what modality is this image?'"
        "   # ask the fine-tuned model",
        soft_wrap=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
