"""The vision_chat recipe as real jobs: a tiny CLIP vision tower and a tiny Llama built from configs, as transformers'
LlavaForConditionalGeneration, on conversation shards of ``biomedgpt-convert --kind conversations`` (coloured
squares and their captions), 2 ranks with torchrun and gloo. Stage ``vlm_align`` (the projector alone) under ZeRO-2
and ZeRO-3: it trains (the loss falls), the projector's weights change and every other weight (vision tower,
language model, head) is bit-identical from the first checkpoint to the last. Its result consolidates into what
transformers' LlavaForConditionalGeneration loads and starts the next stage."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_jobs import kill_job_after_step, losses, run_training

from biomedgpt.checkpoint.consolidate import ZeroCheckpoint
from biomedgpt.data.conversations import convert_conversations

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama tokenizer directory and 48 captioned squares (LLaVA conversation JSON, converted)."""
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("vision_chat")
    LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(root / "tokenizer")
    (root / "images").mkdir()
    rng, records = random.Random(0), []
    for index in range(48):
        colour = rng.choice(sorted(COLOURS))
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), COLOURS[colour]).save(buffer, format="PNG")
        (root / "images" / f"{index}.png").write_bytes(buffer.getvalue())
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"a {colour} square"}]})  # fmt: skip
    (root / "align.json").write_text(json.dumps(records))
    convert_conversations([root / "align.json"], root / "align", image_folder=root / "images")
    return {"tokenizer": root / "tokenizer", "align": root / "align"}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return ZeroCheckpoint(run_dir / "ckpt", f"step_{step:08d}").state_dict(aliases=False)


STEPS = 16


def align_overrides(corpus: dict[str, Path], run_dir: Path, deepspeed_config: str) -> list[str]:
    return [
        f"data.train={corpus['align']}", f"data.tokenizer={corpus['tokenizer']}", f"checkpoint.dir={run_dir / 'ckpt'}",
        f"optim.max_steps={STEPS}", "checkpoint.every_steps=4", "tracking.system_metrics=false",
        f"deepspeed_config={deepspeed_config}", "optim.lr=5e-3", "batch.micro_batch_size=2",
    ]  # fmt: skip


def align(corpus: dict[str, Path], run_dir: Path, deepspeed_config: str) -> str:
    return run_training(run_dir, "vlm_align_tiny", align_overrides(corpus, run_dir, deepspeed_config), nproc=2).stdout


@pytest.fixture(scope="module")
def aligned(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Stage 1 under ZeRO-2."""
    run_dir = tmp_path_factory.mktemp("aligned")
    return run_dir, align(corpus, run_dir, "zero2_cpu.json")


def check_alignment(run_dir: Path, stdout: str) -> None:
    assert f"training finished at step {STEPS}" in stdout
    by_step = losses(run_dir)
    assert sum(by_step[s] for s in (STEPS - 1, STEPS)) < sum(by_step[s] for s in (1, 2)), by_step
    first, last = weights(run_dir, STEPS - 4), weights(run_dir, STEPS)  # the two kept checkpoints
    assert first.keys() == last.keys()
    projector = sorted(name for name in first if ".multi_modal_projector." in name)
    assert len(projector) == 4  # linear_1 and linear_2, weight and bias
    changed = sorted(name for name in first if not torch.equal(first[name], last[name]))
    assert changed == projector
    inner = [name.removeprefix("model.") for name in first if name not in projector]  # the recipe's wrapper
    parts = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0] for name in inner}
    assert parts == {"vision_tower", "language_model", "lm_head"}  # all there, and unchanged
    assert json.loads((run_dir / "ckpt" / "config.json").read_text())["model_type"] == "llava"


def test_alignment_trains_the_projector_alone_under_zero2(aligned: tuple[Path, str]) -> None:
    check_alignment(*aligned)


def test_alignment_trains_the_projector_alone_under_zero3(corpus: dict[str, Path], tmp_path: Path) -> None:
    check_alignment(tmp_path, align(corpus, tmp_path, "zero3_cpu.json"))


def test_sigkill_then_same_command_continues_exactly(
    corpus: dict[str, Path], aligned: tuple[Path, str], tmp_path: Path
) -> None:
    """Shuffled conversations, images decoded in the loader: the restart resumes the data position, the optimizer of
    the trainable part and the schedule, so the per-step losses are the uninterrupted run's."""
    from biomedgpt.train.cli import torchrun_command

    killed = tmp_path / "killed"
    command = torchrun_command("vlm_align_tiny", align_overrides(corpus, killed, "zero2_cpu.json"), 2)
    kill_job_after_step(command, killed, 5, poll=0.05)
    resumed = run_training(killed, "vlm_align_tiny", align_overrides(corpus, killed, "zero2_cpu.json"), nproc=2)
    match = re.search(r"resuming from .* at step (\d+)", resumed.stdout)
    assert match is not None and int(match.group(1)) in (4, 8, 12), resumed.stdout[-3000:]
    expected, continued = losses(aligned[0]), losses(killed)
    assert sorted(continued) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert continued[step] == pytest.approx(expected[step], rel=1e-5), (step, expected, continued)


def test_stage_one_consolidates_for_transformers_and_feeds_the_next_stage(
    corpus: dict[str, Path], aligned: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """biomedgpt-consolidate writes what transformers' LlavaForConditionalGeneration loads, with the logits of
    DeepSpeed's own gathering; a full fine-tune (projector and language model) under ZeRO-3 starts from it
    (model.init_from, loaded partitioned) with the loss that model has in transformers on the same first rows."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from biomedgpt.cli.consolidate import main as consolidate
    from biomedgpt.data.parquet_shards import iter_rows
    from biomedgpt.data.vision_chat import ChatExampleBuilder, VisionChatCollator
    from biomedgpt.model.vision_chat import image_feature_count
    from biomedgpt.train.recipes.vision_chat import VisionChatForTraining

    model_dir = tmp_path / "stage1"
    assert consolidate([str(aligned[0] / "ckpt"), str(model_dir), "--verify", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verify OK")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()

    stage2 = tmp_path / "stage2"
    overrides = [
        f"data.train={corpus['align']}", "data.tokenizer=null", f"checkpoint.dir={stage2 / 'ckpt'}",
        "model.vision_config=null", "model.language_config=null", f"model.init_from={model_dir}",
        "model.trainable=[model.multi_modal_projector.*,model.language_model.*,lm_head.*]",
        "deepspeed_config=zero3_cpu.json", "optim.max_steps=1", "batch.micro_batch_size=2",
        "tracking.system_metrics=false", "data.shuffle=false",
    ]  # fmt: skip
    run_training(stage2, "vlm_align_tiny", overrides, nproc=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    builder = ChatExampleBuilder(tokenizer, AutoImageProcessor.from_pretrained(model_dir), "plain",
                                 image_feature_count(model.config), max_length=64)  # fmt: skip
    rows = [builder(row) for row in iter_rows(corpus["align"], limit=8)]  # the first global batch (no shuffle)
    with torch.no_grad():
        out = VisionChatForTraining(model, chunk_size=64)(**VisionChatCollator(tokenizer.eos_token_id)(rows))
    assert losses(stage2)[1] == pytest.approx(float(out.loss) / out.ntokens, rel=1e-5)


def test_lora_instruction_tuning_trains_the_adapters_and_the_projector_alone(
    corpus: dict[str, Path], aligned: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vlm_instruct_lora (ZeRO-3, the llama2 template) from the stage-1 model: PEFT's LoRA adapters on every linear
    layer of the language model and the projector change, every base weight stays bit-identical; the checkpoint
    consolidates with its adapters and verifies against DeepSpeed's gathering."""
    from biomedgpt.cli.consolidate import main as consolidate

    stage1 = tmp_path / "stage1"
    assert consolidate([str(aligned[0] / "ckpt"), str(stage1), "--no-progress"]) == 0
    run_dir = tmp_path / "lora"
    overrides = [
        f"data.train={corpus['align']}", f"checkpoint.dir={run_dir / 'ckpt'}", f"model.init_from={stage1}",
        f"optim.max_steps={STEPS}", "checkpoint.every_steps=4", "tracking.system_metrics=false", "optim.lr=1e-2",
        "batch.micro_batch_size=2",
    ]  # fmt: skip
    run_training(run_dir, "vlm_instruct_lora_tiny", overrides, nproc=2)
    first, last = weights(run_dir, STEPS - 4), weights(run_dir, STEPS)
    changed = {name for name in first if not torch.equal(first[name], last[name])}
    adapters = {name for name in first if ".lora_A." in name or ".lora_B." in name}
    projector = {name for name in first if ".multi_modal_projector." in name}
    # 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B); never the head or the vision tower.
    assert len(adapters) == 28 and not any("lm_head" in n or "vision_tower" in n for n in adapters)
    assert changed == adapters | projector
    assert any(".base_layer." in name for name in first)  # the adapted layers' frozen weights, unchanged
    assert consolidate([str(run_dir / "ckpt"), str(tmp_path / "hf"), "--verify", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verify OK")
    check_merge_and_adapter(tmp_path / "hf", stage1, tmp_path)


def check_merge_and_adapter(lora_dir: Path, base_dir: Path, tmp_path: Path) -> None:
    """biomedgpt-merge-lora: the merged model (transformers' Llava) and the PEFT adapter on the stage-1 model (with the
    projector from non_lora_trainables) give the logits of the unmerged model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from biomedgpt.checkpoint.model_formats import VisionChatFormat
    from biomedgpt.cli.merge_lora import main as merge
    from biomedgpt.model.vision_chat import load_vision_chat_model

    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    assert merge([str(lora_dir), str(merged_dir), "--adapter-out", str(adapter_dir)]) == 0
    unmerged = load_vision_chat_model(lora_dir)[0].eval()
    batch = VisionChatFormat().dummy_batch(unmerged.config)
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name in merged.state_dict())
    base = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
    base.load_state_dict(load_file(adapter_dir / "non_lora_trainables.safetensors"), strict=False)
    assert len(load_file(adapter_dir / "adapter_model.safetensors")) == 28
    with torch.no_grad():
        reference = unmerged(**batch).logits
        assert not torch.equal(reference, base(**batch).logits)  # the adapters matter
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()  # injects into base
        torch.testing.assert_close(merged(**batch).logits, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(adapted(**batch).logits, reference, rtol=0, atol=1e-5)
