"""The causal_lm recipe as real jobs: a tiny Llama built from an inline config (and the SentencePiece model the
project ships, as a Llama tokenizer) on token shards of ``biomedgpt-convert --kind documents --keep-document-ids``,
ZeRO-3 on 2 ranks with torchrun and gloo.

One trained job (``trained``) answers several claims: the loss falls on a learnable corpus, perplexity on a held-out
split is validated and falls, the checkpoint consolidates into a directory ``AutoModelForCausalLM`` loads with the
logits of the weights DeepSpeed itself gathers, and that model answers held-out PubMedQA-style questions above
chance and above the majority answer. Other jobs: a run continues from that consolidated directory (``model.path``,
loaded partitioned) with the loss it has in transformers; 1 rank gives the trained job's losses and gradient norms
for the same global batch split another way; SIGKILL and the same command give the same per-step losses and validations;
the 7B preset plans offline (no weights) and bad data is refused."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from training_jobs import kill_job_after_step, losses, metric_records, run_training

from biomedgpt.data.documents import convert_documents
from biomedgpt.data.parquet_shards import iter_rows
from biomedgpt.train.cli import torchrun_command

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
# PubMedQA-style questions whose answer follows from the organ asked about: learnable, and balanced (the majority
# answer is right about half the time, chance a third: yes, no or maybe).
ANSWERS = {"liver": "yes", "heart": "yes", "lungs": "no", "kidneys": "no"}
STEPS, EVERY = 40, 10


def questions(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        organ = rng.choice(sorted(ANSWERS))
        context = f"{organ} imaging shows the {organ}, {organ} size and {organ} function."
        rows.append({"id": f"{seed}-{index}", "context": context, "question": f"{organ}?",
                     "final_decision": ANSWERS[organ]})  # fmt: skip
    return rows


def document(question: dict) -> str:
    """A question as the training text: the multiple-choice prompt (biomedgpt.evaluation.multiple_choice) + answer."""
    return f"Context: {question['context']}\nQuestion: {question['question']}\nAnswer: {question['final_decision']}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama tokenizer directory, packed 64-token rows with document ids (training and held-out), and held-out
    questions in the PubMedQA layout."""
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("causal_lm")
    tokenizer_dir = root / "tokenizer"
    LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(tokenizer_dir)
    for name, count, seed in (("train", 400, 0), ("valid", 40, 1)):
        texts = write_jsonl(root / f"{name}.jsonl", [{"text": document(q)} for q in questions(count, seed)])
        convert_documents([texts], root / name, tokenizer_dir, seq_len=64, keep_document_ids=True)
    return {"tokenizer": tokenizer_dir, "tokens": root / "train", "valid": root / "valid",
            "questions": write_jsonl(root / "questions.jsonl", questions(60, 2))}  # fmt: skip


def overrides(corpus: dict[str, Path], run_dir: Path, steps: int = STEPS, extra: list[str] = ()) -> list[str]:
    return [
        f"data.train={corpus['tokens']}", f"data.tokenizer={corpus['tokenizer']}", f"checkpoint.dir={run_dir / 'ckpt'}",
        f"optim.max_steps={steps}", "tracking.system_metrics=false", "log_every_steps=1", "data.shuffle=false",
        "optim.lr=1e-2", f"validation.data={corpus['valid']}", f"validation.every_steps={EVERY}",
        f"checkpoint.every_steps={EVERY}", "batch.micro_batch_size=2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("trained")
    proc = run_training(run_dir, "causal_lm_tiny", overrides(corpus, run_dir), nproc=2)
    return run_dir, proc.stdout


def validations(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metric_records(run_dir) if "val/perplexity" in r}


def test_loss_falls_and_held_out_perplexity_is_validated(corpus: dict[str, Path], trained: tuple[Path, str]) -> None:
    run_dir, stdout = trained
    by_step = losses(run_dir)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert sum(by_step[s] for s in range(STEPS - 2, STEPS + 1)) / 3 < 0.5 * by_step[1], by_step
    record = [r for r in metric_records(run_dir) if "loss" in r][-1]
    assert record["target_tokens"] > 0 and record["tflops_per_device"] > 0 and record["tokens_per_second"] > 0
    assert (run_dir / "ckpt" / "config.json").is_file() and (run_dir / "ckpt" / "tokenizer").is_dir()
    assert f"training finished at step {STEPS}" in stdout

    checks = validations(run_dir)
    assert sorted(checks) == list(range(EVERY, STEPS + 1, EVERY))
    # Every held-out token after a row's first is a target, once, whatever the ranks' shares.
    rows = list(iter_rows(corpus["valid"]))
    assert all(r["val/tokens"] == sum(len(row["input_ids"]) - 1 for row in rows) for r in checks.values())
    for record in checks.values():
        assert record["val/perplexity"] == pytest.approx(math.exp(record["val/loss"]), rel=1e-12)
    assert checks[STEPS]["val/perplexity"] < 0.5 * checks[EVERY]["val/perplexity"], checks
    assert re.search(rf"validation at step {STEPS}: perplexity=[\d.]+ \((new best|best [\d.]+ at \d+)\)", stdout)


def test_consolidated_directory_loads_in_transformers_and_answers_above_chance(
    corpus: dict[str, Path], trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from biomedgpt.cli.consolidate import main as consolidate
    from biomedgpt.cli.evaluate import main as evaluate

    ckpt, out = trained[0] / "ckpt", tmp_path / "hf"
    assert consolidate([str(ckpt), str(out), "--verify", "--no-progress"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[-1].startswith("verify OK") and "bitwise equal" in summary[-1], summary

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM) and len(AutoTokenizer.from_pretrained(out)) == 3000
    # The weights DeepSpeed gathers from its own partitions, in the recipe's wrapper (``model.`` + the HF keys).
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    reference = LlamaForCausalLM(model.config)
    reference.load_state_dict({key.removeprefix("model."): value for key, value in gathered.items()})
    ids = torch.randint(0, 3000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)

    assert evaluate(["--model", str(out), "--task", "pubmedqa", "--data", str(corpus["questions"]),
                     "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    majority = max(sum(q["final_decision"] == a for q in questions(60, 2)) for a in ("yes", "no")) / 60
    assert metrics["chance"] == pytest.approx(1 / 3) and majority < 0.6
    assert metrics["accuracy"] >= 0.8, metrics


def test_a_run_continues_from_the_consolidated_directory(
    corpus: dict[str, Path], trained: tuple[Path, str], tmp_path: Path
) -> None:
    """``model.path``: the consolidated model, loaded partitioned under ZeRO-3 by transformers, starts a new run (with
    gradient checkpointing) whose first loss is the loss that model has in transformers on that first batch (not a
    freshly initialised one's)."""
    from transformers import AutoModelForCausalLM

    from biomedgpt.cli.consolidate import main as consolidate
    from biomedgpt.data.token_stream import TokenCollator, token_row
    from biomedgpt.train.recipes.causal_lm import CausalLMForTraining

    model_dir = tmp_path / "hf"
    assert consolidate([str(trained[0] / "ckpt"), str(model_dir), "--no-progress"]) == 0
    continued = tmp_path / "continued"
    run_training(continued, "causal_lm_tiny", overrides(corpus, continued, extra=[
        "model.config=null", f"model.path={model_dir}", "data.tokenizer=null", "optim.max_steps=1",
        "validation.data=null", "model.gradient_checkpointing=true"]), nproc=2)  # fmt: skip
    first = losses(continued)[1]

    model = CausalLMForTraining(AutoModelForCausalLM.from_pretrained(model_dir), chunk_size=64).eval()
    rows = [token_row(row) for row in iter_rows(corpus["tokens"], limit=8)]  # the first global batch (no shuffle)
    with torch.no_grad():
        out = model(**TokenCollator(2)(rows))
    assert first == pytest.approx(float(out.loss) / out.ntokens, rel=1e-5)
    assert first < 0.5 * losses(trained[0])[1]  # far below an untrained model's


def test_one_rank_matches_two_ranks_with_the_same_global_batch(
    corpus: dict[str, Path], trained: tuple[Path, str], tmp_path: Path
) -> None:
    # The same max_steps (the schedule depends on it), stopped once 3 steps are logged.
    one_rank = tmp_path / "one"
    command = torchrun_command("causal_lm_tiny", overrides(corpus, one_rank, extra=["batch.micro_batch_size=4"]), 1)
    kill_job_after_step(command, one_rank, 3, nproc=1)
    one = {r["step"]: r for r in metric_records(one_rank) if "loss" in r}
    two = {r["step"]: r for r in metric_records(trained[0]) if "loss" in r}
    for step in (1, 2, 3):
        for metric in ("loss", "grad_norm", "target_tokens"):
            assert one[step][metric] == pytest.approx(two[step][metric], rel=1e-4), (step, metric)


def test_sigkill_then_same_command_continues_exactly(
    corpus: dict[str, Path], trained: tuple[Path, str], tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    kill_job_after_step(torchrun_command("causal_lm_tiny", overrides(corpus, killed), 2), killed, EVERY + 2)
    resumed = run_training(killed, "causal_lm_tiny", overrides(corpus, killed), nproc=2)
    match = re.search(r"resuming from .* at step (\d+)", resumed.stdout)
    assert match is not None and int(match.group(1)) in range(EVERY, STEPS, EVERY), resumed.stdout[-3000:]
    expected, continued = losses(trained[0]), losses(killed)
    assert sorted(continued) == sorted(expected)
    for step in expected:  # the data position, optimizer, schedule and best validation restored
        assert continued[step] == pytest.approx(expected[step], rel=1e-5), (step, expected, continued)
    for step, record in validations(trained[0]).items():
        assert validations(killed)[step]["val/perplexity"] == pytest.approx(record["val/perplexity"], rel=1e-5)


def test_the_7b_preset_plans_offline_and_bad_data_is_refused(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from biomedgpt.train.cli import main

    monkeypatch.chdir(tmp_path)  # where the preset's data and model paths do not exist
    for world_size, weights_gib in ((8, 1.569), (16, 0.784), (64, 0.196)):
        assert main(["--config", "continued_pretrain_7b", "--dry-run", "--world-size", str(world_size),
                     "--allow-missing-data"]) == 0  # fmt: skip
        plan = capsys.readouterr().out
        assert "llama: 6,738,415,616 parameters" in plan  # Llama-2-7B, from the preset's inline config
        assert f"weights: {weights_gib:.3f} GiB" in plan
        # DeepSpeed's own ZeRO-3 estimate for 8-GPU nodes (the embedding, 32,000 x 4,096, is the largest layer).
        _, deepspeed_bytes, _ = estimate_zero3_model_states_mem_needs(
            6_738_415_616, 32_000 * 4_096, num_gpus_per_node=8, num_nodes=world_size // 8, cpu_offload=False
        )
        total_gib = float(re.search(r"^total: ([\d.]+) GiB$", plan, re.MULTILINE).group(1))
        assert total_gib == pytest.approx(deepspeed_bytes / 2**30, rel=0.05), (total_gib, deepspeed_bytes / 2**30)
    tokens = ["--config", "causal_lm_tiny", f"data.tokenizer={corpus['tokenizer']}"]
    assert main([*tokens, f"data.train={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert f"data.train={tmp_path}: " in error and "--kind documents" in error
    assert main([*tokens, f"data.train={corpus['tokens']}", f"validation.data={tmp_path}"]) == 2
    assert f"validation.data={tmp_path}: " in capsys.readouterr().err
