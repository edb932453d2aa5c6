"""Each of the five fine-tuning tasks end to end on the sample corpus: a real 2-rank ZeRO-3 fine-tune of the tiny
model (the task's preset, shrunk) with periodic validation keeping the best model, then ``biomedgpt-eval`` on that
model and on the consolidated final checkpoint.

The validation numbers the trainer records must be reproduced by ``biomedgpt-eval`` on the best model directory:
both use the same decoding and metric code, and the directory must hold the weights that were validated (the EMA
weights for VQA) and the input settings they were trained with.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from training_jobs import SMALL, environment, losses, metric_records, mlflow_runs, run_training

from biomedgpt.demo import prepare_demo_data
from biomedgpt.train.cli import torchrun_command

pytestmark = pytest.mark.slow

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune_data")
    prepare_demo_data(root, rows=16, image_size=64)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A model directory to start from (as a consolidated pretraining run or an imported checkpoint gives)."""
    import torch

    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    directory = tmp_path_factory.mktemp("pretrained")
    tokenizer = BiomedGPTTokenizer.default()
    torch.manual_seed(0)
    BiomedGPTForConditionalGeneration(BiomedGPTConfig.for_size("tiny", vocab_size=len(tokenizer))).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    return directory


def task_overrides(task: str, data_root: Path, run_dir: Path, start_from: Path | None = None) -> list[str]:
    corpus, converted = data_root / "corpus", data_root / "converted"
    start = [f"model.init_from={start_from}", f"data.tokenizer={start_from}"] if start_from else [
        "model.init_from=null", "data.tokenizer=null", "data.allow_demo_tokenizer=true"]  # fmt: skip
    common = [
        "model.size=tiny", *start, f"data.train={converted / f'{task}_train'}",
        "precision=fp32", "deepspeed_config=zero3_cpu.json", f"checkpoint.dir={run_dir / 'ckpt'}",
        f"optim.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", f"validation.data={converted / f'{task}_val'}",
        f"validation.every_steps={EVERY}", "validation.batch_size=1", f"tracking.experiment=finetune-{task}", *SMALL,
    ]  # fmt: skip
    specific = {
        "vqa": [
            f"data.answers={corpus / 'vqa_ans2label.json'}",
            f"validation.answer_types={corpus / 'vqa_answer_types.json'}",
            "ema.decay=0.9",  # the preset enables EMA; a short run needs a short memory to move at all
        ],
        "caption": ["optim.drop_worst_after=1", "validation.max_len_b=8"],  # the preset drops 20% after 600
        "summarization": ["validation.beam=2", "validation.max_len_b=8"],
        "nli": [],
        "classification": [f"data.answers={corpus / 'classification_class2label.json'}"],
    }
    return common + specific[task]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Decode on one thread, as the ranks (OMP_NUM_THREADS=1) validated: an untrained model's near-ties must not
    flip on thread-count differences in the float sums."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eval_cli(model_dir: Path, task: str, data: Path, out: Path, *extra: str) -> dict:
    """``biomedgpt-eval`` one row at a time on one thread, as the ranks validated (no padding differences)."""
    from biomedgpt.cli.evaluate import main as eval_main

    with one_thread():
        code = eval_main(["--model", str(model_dir), "--task", task, "--data", str(data), "--out", str(out),
                          "--batch-size", "1", "--no-progress", *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("task", ["vqa", "caption", "summarization", "nli", "classification"])
def test_finetune_validate_keep_best_then_evaluate(task, data_root, pretrained, tmp_path):
    from biomedgpt.checkpoint.consolidate import consolidate_checkpoint
    from biomedgpt.evaluation.runner import iter_rows
    from biomedgpt.tasks import finetune_task

    run_dir = tmp_path / task
    # Classification starts from a model directory (model.init_from), the others from scratch.
    start_from = pretrained if task == "classification" else None
    proc = run_training(run_dir, f"finetune_{task}", task_overrides(task, data_root, run_dir, start_from), nproc=2)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    metric = finetune_task(task).default_metric
    validations = {r["step"]: r[f"val/{metric}"] for r in metric_records(run_dir) if f"val/{metric}" in r}
    assert sorted(validations) == [EVERY, STEPS]
    assert f"validation at step {EVERY}: {metric}=" in proc.stdout

    # The best model: the first step reaching the highest validation value, written as a model directory.
    best_value = max(validations.values())
    best_step = min(step for step, value in validations.items() if value == best_value)
    best_dir = run_dir / "ckpt" / "best"
    summary = json.loads((best_dir / "validation_metrics.json").read_text())
    assert summary["step"] == best_step and summary[metric] == pytest.approx(best_value)
    assert summary["weights"] == ("ema" if task == "vqa" else "live")
    assert json.loads((best_dir / "finetune_task.json").read_text())["task"] == task

    store = run_dir / "mlruns.db"
    (run,) = mlflow_runs(store, f"finetune-{task}")
    assert run.info.status == "FINISHED"
    assert run.data.metrics[f"best/{metric}"] == pytest.approx(best_value)
    assert run.data.tags["best_step"] == str(best_step)
    history = MlflowClient(f"sqlite:///{store}").get_metric_history(run.info.run_id, f"val/{metric}")
    assert {m.step: m.value for m in history} == pytest.approx(validations)

    # biomedgpt-eval on the best directory reproduces the validation: same code, the validated weights, and the
    # image size / answers read from the directory (no --image-size or --answers given).
    extra = {
        "vqa": ["--answer-types", str(data_root / "corpus" / "vqa_answer_types.json")],
        "caption": ["--max-len-b", "8"],  # the validation decoding of task_overrides
        "summarization": ["--beam", "2", "--max-len-b", "8"],
    }.get(task, [])
    converted = data_root / "converted"
    again = eval_cli(best_dir, task, converted / f"{task}_val", tmp_path / "eval_best", *extra)
    assert again[metric] == pytest.approx(best_value, abs=1e-9)
    validated = (best_dir / "validation_predictions.jsonl").read_text()
    assert (tmp_path / "eval_best" / "predictions.jsonl").read_text() == validated
    assert again["params"]["image_size"] == 64
    if task == "vqa":
        assert again["closed_count"] + again["open_count"] == again["count"]

    if start_from is not None:
        # The recipe freezes the shared embedding: it is the starting model's, the rest has moved.
        start, tuned = load_file(start_from / "model.safetensors"), load_file(best_dir / "model.safetensors")
        embedding = next(k for k in tuned if k.endswith("embed_tokens.weight"))
        assert tuned[embedding].equal(start[embedding])
        moved = next(k for k in tuned if "layers.0" in k and k.endswith("fc1.weight"))
        assert not tuned[moved].equal(start[moved])
    if task == "vqa":
        check_generate_answers_as_evaluation(best_dir, converted / "vqa_val", tmp_path)

    # The consolidated final checkpoint evaluates on the test split.
    model_dir = run_dir / "model"
    consolidate_checkpoint(run_dir / "ckpt", model_dir, progress=False)
    assert (model_dir / "finetune_task.json").is_file()
    final = eval_cli(model_dir, task, converted / f"{task}_test", tmp_path / "eval_test", *extra)
    test_rows = list(iter_rows(converted / f"{task}_test"))
    assert (
        final["count"] == len(test_rows) == len((tmp_path / "eval_test" / "predictions.jsonl").read_text().splitlines())
    )
    if task == "vqa":
        # The best directory holds the averaged weights, the checkpoint the live ones.
        live, averaged = load_file(model_dir / "model.safetensors"), load_file(best_dir / "model.safetensors")
        name = next(k for k in averaged if "layers.0" in k and k.endswith("fc1.weight"))
        assert not live[name].equal(averaged[name])
        check_resume_keeps_ema_and_best(
            data_root, run_dir, json.loads((best_dir / "validation_metrics.json").read_text())
        )


def check_generate_answers_as_evaluation(best_dir: Path, val_data: Path, tmp_path: Path) -> None:
    """biomedgpt-generate on a fine-tuned VQA directory answers like the evaluation: the question as decoder
    prefix, the candidate answers and image size from the directory (greedy, as the VQA evaluation decodes)."""

    from biomedgpt.cli.generate import main as generate_main
    from biomedgpt.data.images import decode_image
    from biomedgpt.evaluation.runner import iter_rows

    predictions = {
        r["id"]: r["prediction"] for r in map(json.loads, (tmp_path / "eval_best" / "predictions.jsonl").open())
    }
    row = next(r for r in iter_rows(val_data) if not r.get("objects"))  # no objects: the same encoder input
    image, requests, answers = tmp_path / "question.png", tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    decode_image(row["image"], "val row").save(image)
    requests.write_text(json.dumps({"image": str(image), "prompt": row["question"]}) + "\n")
    with one_thread():
        code = generate_main(["--model", str(best_dir), "--batch", str(requests), "--beam", "1",
                              "--out", str(answers)])  # fmt: skip
    assert code == 0
    output = json.loads(answers.read_text())["output"]
    recorded = json.loads((best_dir / "finetune_task.json").read_text())["answers"]
    assert output in recorded
    assert output == predictions[str(row["question_id"])]


def check_resume_keeps_ema_and_best(data_root: Path, run_dir: Path, first_best: dict) -> None:
    """Another rank count is refused with advice and the checkpoints are left alone; the same count resumes with
    the saved EMA, and validation goes on from the saved best value."""
    overrides = [o for o in task_overrides("vqa", data_root, run_dir) if not o.startswith("optim.max_steps=")]
    overrides.append(f"optim.max_steps={STEPS + EVERY}")
    saved = sorted(p.name for p in (run_dir / "ckpt").iterdir())
    refused = subprocess.run(
        torchrun_command("finetune_vqa", overrides, nproc=1), env=environment(run_dir), cwd=run_dir,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert "was saved by 2 ranks and this run has 1" in refused.stderr
    assert "biomedgpt-consolidate" in refused.stderr
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == saved

    resumed = run_training(run_dir, "finetune_vqa", overrides, nproc=2)
    assert re.search(rf"resuming from .* at step {STEPS} with the EMA of {STEPS} updates", resumed.stdout)
    assert f"validation at step {STEPS + EVERY}: accuracy=" in resumed.stdout
    assert sorted(losses(run_dir)) == list(range(1, STEPS + EVERY + 1))
    best = json.loads((run_dir / "ckpt" / "best" / "validation_metrics.json").read_text())
    assert best["accuracy"] >= first_best["accuracy"]
    assert best["step"] == first_best["step"] or best["accuracy"] > first_best["accuracy"]


def test_a_stop_on_a_due_step_validates_that_step_on_resume(data_root, tmp_path):
    """The wall-clock stop lands on step 1, which is due for validation: the job saves and exits without
    validating; the next start has no steps left but validates step 1 before finishing."""
    run_dir = tmp_path / "stopped"
    overrides = [
        o for o in task_overrides("nli", data_root, run_dir)
        if not o.startswith(("optim.max_steps=", "validation.every_steps="))
    ] + ["optim.max_steps=1", "validation.every_steps=1"]  # fmt: skip
    stopped = run_training(run_dir, "finetune_nli", [*overrides, "checkpoint.wall_clock_minutes=0.00001"], nproc=2)
    assert "stopping at step 1" in stopped.stdout and "validation at step" not in stopped.stdout
    assert not (run_dir / "ckpt" / "best").exists()
    resumed = run_training(run_dir, "finetune_nli", overrides, nproc=2)
    assert "resuming from" in resumed.stdout and "validation at step 1: accuracy=" in resumed.stdout
    assert json.loads((run_dir / "ckpt" / "best" / "validation_metrics.json").read_text())["step"] == 1
