"""The causal_lm recipe as real jobs: a tiny Llama built from an inline config (and the SentencePiece model the
project ships, as a Llama tokenizer) on token shards of ``biomedgpt-convert --kind documents``, ZeRO-3 on 2 ranks
with torchrun and gloo. The loss falls on a learnable corpus, and 2 ranks give 1 rank's losses and gradient norms
for the same global batch split another way. Also: the 7B preset plans offline (no weights) and refuses bad data."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from training_jobs import losses, metric_records, run_training

from biomedgpt.data.documents import convert_documents

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
SENTENCES = [
    "the liver filters the blood and stores glycogen.",
    "the heart pumps blood through the arteries.",
    "the lungs exchange oxygen and carbon dioxide.",
    "the kidneys filter waste into the urine.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama tokenizer directory and 32-token rows of a repetitive (so learnable) corpus."""
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("causal_lm")
    tokenizer_dir = root / "tokenizer"
    LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(tokenizer_dir)
    rng = random.Random(0)
    documents = root / "documents.jsonl"
    lines = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 6))) for _ in range(120)]
    documents.write_text("".join(f'{{"text": "{line}"}}\n' for line in lines))
    convert_documents([documents], root / "tokens", tokenizer_dir, seq_len=32)
    return {"tokenizer": tokenizer_dir, "tokens": root / "tokens"}


def overrides(corpus: dict[str, Path], run_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        f"data.train={corpus['tokens']}", f"data.tokenizer={corpus['tokenizer']}", f"checkpoint.dir={run_dir / 'ckpt'}",
        f"optim.max_steps={steps}", "tracking.system_metrics=false", "log_every_steps=1", "data.shuffle=false", *extra,
    ]  # fmt: skip


def test_loss_falls_and_the_run_records_its_model(corpus: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir,
        "causal_lm_tiny",
        overrides(corpus, run_dir, 12, ["optim.lr=1e-2", "batch.micro_batch_size=2"]),
        nproc=2,
    )
    by_step = losses(run_dir)
    assert sorted(by_step) == list(range(1, 13))
    assert sum(by_step[s] for s in (10, 11, 12)) / 3 < 0.5 * by_step[1], by_step
    record = metric_records(run_dir)[-1]
    assert record["target_tokens"] > 0 and record["tflops_per_device"] > 0 and record["tokens_per_second"] > 0
    assert (run_dir / "ckpt" / "config.json").is_file() and (run_dir / "ckpt" / "tokenizer").is_dir()
    assert "training finished at step 12" in proc.stdout


def test_two_ranks_match_one_rank_with_the_same_global_batch(corpus: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for name, nproc, micro in (("one", 1, 4), ("two", 2, 2)):
        run_dir = tmp_path / name
        run_training(run_dir, "causal_lm_tiny", overrides(corpus, run_dir, 3, [f"batch.micro_batch_size={micro}"]),
                     nproc=nproc)  # fmt: skip
        runs[name] = {r["step"]: r for r in metric_records(run_dir) if "loss" in r}
    for step in (1, 2, 3):
        for metric in ("loss", "grad_norm", "target_tokens"):
            assert runs["two"][step][metric] == pytest.approx(runs["one"][step][metric], rel=1e-4), (step, metric)


def test_the_7b_preset_plans_offline_and_bad_data_is_refused(corpus: dict[str, Path], tmp_path: Path) -> None:
    def train(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "biomedgpt.train", *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)  # fmt: skip

    for world_size, weights_gib in (("8", 1.569), ("64", 0.196)):
        plan = train("--config", "continued_pretrain_7b", "--dry-run", "--world-size", world_size,
                     "--allow-missing-data")  # fmt: skip
        assert plan.returncode == 0, plan.stderr[-2000:]
        assert "llama: 6,738,415,616 parameters" in plan.stdout  # Llama-2-7B, from the preset's inline config
        assert f"weights: {weights_gib:.3f} GiB" in plan.stdout
    not_tokens = train("--config", "causal_lm_tiny", f"data.train={tmp_path}", f"data.tokenizer={corpus['tokenizer']}")
    assert not_tokens.returncode == 2 and f"data.train={tmp_path}: " in not_tokens.stderr
    assert "--kind documents" in not_tokens.stderr
