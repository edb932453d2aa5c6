"""The vision_chat recipe as real jobs: a tiny CLIP vision tower and a tiny Llama built from configs, as transformers'
LlavaForConditionalGeneration, on conversation shards of ``biomedgpt-convert --kind conversations`` (coloured
squares and their captions), 2 ranks with torchrun and gloo. Stage ``vlm_align`` (the projector alone) under ZeRO-2
and ZeRO-3: it trains (the loss falls), the projector's weights change and every other weight (vision tower,
language model, head) is bit-identical from the first checkpoint to the last."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_jobs import losses, run_training

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


@pytest.mark.parametrize("deepspeed_config", ["zero2_cpu.json", "zero3_cpu.json"])
def test_alignment_trains_the_projector_alone(corpus: dict[str, Path], tmp_path: Path, deepspeed_config: str) -> None:
    steps = 8
    overrides = [
        f"data.train={corpus['align']}", f"data.tokenizer={corpus['tokenizer']}", f"checkpoint.dir={tmp_path / 'ckpt'}",
        f"optim.max_steps={steps}", "checkpoint.every_steps=4", "tracking.system_metrics=false",
        f"deepspeed_config={deepspeed_config}", "optim.lr=5e-3", "batch.micro_batch_size=2",
    ]  # fmt: skip
    proc = run_training(tmp_path, "vlm_align_tiny", overrides, nproc=2)
    assert f"training finished at step {steps}" in proc.stdout
    by_step = losses(tmp_path)
    assert sum(by_step[s] for s in (steps - 1, steps)) < sum(by_step[s] for s in (1, 2)), by_step

    first, last = weights(tmp_path, 4), weights(tmp_path, steps)
    assert first.keys() == last.keys()
    projector = sorted(name for name in first if ".multi_modal_projector." in name)
    assert len(projector) == 4  # linear_1 and linear_2, weight and bias
    changed = sorted(name for name in first if not torch.equal(first[name], last[name]))
    assert changed == projector
    inner = [name.removeprefix("model.") for name in first if name not in projector]  # the recipe's wrapper
    parts = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0] for name in inner}
    assert parts == {"vision_tower", "language_model", "lm_head"}  # all there, and unchanged
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "llava"
