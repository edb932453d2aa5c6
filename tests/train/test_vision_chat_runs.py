"""The vision_chat recipe as real jobs: a tiny CLIP vision tower and a tiny Llama built from configs, as transformers'
LlavaForConditionalGeneration, on conversation shards of ``biomedgpt-convert --kind conversations`` (coloured
squares: captions, and questions about them as dialogues), 2 ranks with torchrun and gloo. Stage ``vlm_align`` (the
projector alone) under ZeRO-2 and ZeRO-3, from inline configs and from the parts' directories: it trains (the loss
falls), the projector's weights change and every other weight is bit-identical from the first checkpoint to the
last; SIGKILL and the same command continue with the same losses. Its result consolidates into what transformers
loads and starts the next stages: a full fine-tune, LoRA instruction tuning (ZeRO-3) and LoRA fine-tuning on VQA
dialogues with the stage-2 adapter stacked (ZeRO-2), which beats the majority answer once merged."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_jobs import kill_job_after_step, losses, metric_records, run_training

from biomedgpt.checkpoint.consolidate import ZeroCheckpoint
from biomedgpt.data.conversations import convert_conversations

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
PRESETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "train" / "presets"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
QUESTION = "What colour is the square?"


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
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / "images" / f"{colour}.png")
    for split, count in (("vqa_train", 48), ("vqa_test", 24)):  # VQA rewritten as a dialogue: one question each
        questions = []
        for index in range(count):
            colour = rng.choice(sorted(COLOURS))
            question, answer = QUESTION, colour
            if index % 3 == 2:  # a closed question (yes or no), for the closed/open split
                question, answer = "Is the square red?", "yes" if colour == "red" else "no"
            turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            questions.append({"id": f"{split}-{index}", "image": f"{colour}.png", "conversations": turns})
        (root / f"{split}.json").write_text(json.dumps(questions))
        convert_conversations([root / f"{split}.json"], root / split, image_folder=root / "images")
    return {"tokenizer": root / "tokenizer", "align": root / "align", "images": root / "images",
            "vqa_train": root / "vqa_train", "vqa_test": root / "vqa_test", **part_directories(root)}  # fmt: skip


def part_directories(root: Path) -> dict[str, Path]:
    """The preset's tower and language model saved as Hugging Face directories: a whole CLIP model (its vision half is
    the tower, as LLaVA loads openai/clip-vit-large-patch14) with its image processor, and a Llama."""
    import yaml
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM

    preset = yaml.safe_load((PRESETS / "vlm_align_tiny.yaml").read_text())["model"]
    vision = {k: v for k, v in preset["vision_config"].items() if k != "model_type"}
    text = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "projection_dim": 16}  # fmt: skip
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    size = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        root / "clip"
    )
    language = {k: v for k, v in preset["language_config"].items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**language)).save_pretrained(root / "llama")
    return {"vision": root / "clip", "language": root / "llama"}


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


def test_alignment_trains_the_projector_alone_under_zero2(aligned: tuple[Path, str], tmp_path: Path) -> None:
    """... and biomedgpt-consolidate --trained-only writes the projector's weights alone (LLaVA's stage-1 output)."""
    from safetensors.torch import load_file

    from biomedgpt.cli.consolidate import main as consolidate

    check_alignment(*aligned)
    assert consolidate([str(aligned[0] / "ckpt"), str(tmp_path / "projector"), "--trained-only", "--no-progress"]) == 0
    assert consolidate([str(aligned[0] / "ckpt"), str(tmp_path / "full"), "--no-progress"]) == 0
    trained = load_file(tmp_path / "projector" / "trained_parameters.safetensors")
    full = load_file(tmp_path / "full" / "model.safetensors")
    assert sorted(trained) == sorted(name for name in full if name.startswith("model.multi_modal_projector."))
    assert len(trained) == 4 and all(torch.equal(trained[name], full[name]) for name in trained)


def test_alignment_under_zero3_from_the_parts_directories(corpus: dict[str, Path], tmp_path: Path) -> None:
    """The tower (the vision half of a whole CLIP model) and the language model loaded from their own directories,
    partitioned: their weights are those of the directories, and only the projector trains."""
    from safetensors.torch import load_file

    overrides = align_overrides(corpus, tmp_path, "zero3_cpu.json") + [
        "model.vision_config=null", f"model.vision={corpus['vision']}",
        "model.language_config=null", f"model.language={corpus['language']}",
    ]  # fmt: skip
    check_alignment(tmp_path, run_training(tmp_path, "vlm_align_tiny", overrides, nproc=2).stdout)
    trained = weights(tmp_path, STEPS)
    clip = load_file(corpus["vision"] / "model.safetensors")
    llama = load_file(corpus["language"] / "model.safetensors")
    expected = {f"model.model.vision_tower.{k}": v for k, v in clip.items() if k.startswith("vision_model.")}
    expected |= {
        f"model.model.language_model.{k.removeprefix('model.')}": v for k, v in llama.items() if k != "lm_head.weight"
    }
    expected["model.lm_head.weight"] = llama["lm_head.weight"]
    assert {k for k in trained if ".multi_modal_projector." not in k} == set(expected)
    assert all(torch.equal(trained[k], v) for k, v in expected.items())


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
    DeepSpeed's own gathering; a full fine-tune (vlm_finetune_full: projector and language model) under ZeRO-3
    starts from it (model.init_from, loaded partitioned) with the loss that model has in transformers on the same
    first rows."""
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
        f"data.train={corpus['align']}", f"checkpoint.dir={stage2 / 'ckpt'}", f"model.init_from={model_dir}",
        "optim.max_steps=1", "batch.micro_batch_size=2", "tracking.system_metrics=false", "data.shuffle=false",
    ]  # fmt: skip
    run_training(stage2, "vlm_finetune_full_tiny", overrides, nproc=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    builder = ChatExampleBuilder(tokenizer, AutoImageProcessor.from_pretrained(model_dir), "llama2",
                                 image_feature_count(model.config), max_length=96)  # fmt: skip
    rows = [builder(row) for row in iter_rows(corpus["align"], limit=8)]  # the first global batch (no shuffle)
    with torch.no_grad():
        out = VisionChatForTraining(model, chunk_size=64)(**VisionChatCollator(tokenizer.eos_token_id)(rows))
    assert losses(stage2)[1] == pytest.approx(float(out.loss) / out.ntokens, rel=1e-5)


@pytest.fixture(scope="module")
def instructed(corpus: dict[str, Path], aligned: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 2 (vlm_instruct_lora, ZeRO-3) from the consolidated stage-1 model: the folder with ``stage1`` (that
    model), ``lora`` (the run) and ``hf`` (its consolidation, adapters included, verified)."""
    from biomedgpt.cli.consolidate import main as consolidate

    root = tmp_path_factory.mktemp("instructed")
    assert consolidate([str(aligned[0] / "ckpt"), str(root / "stage1"), "--no-progress"]) == 0
    run_dir = root / "lora"
    overrides = [
        f"data.train={corpus['align']}", f"checkpoint.dir={run_dir / 'ckpt'}", f"model.init_from={root / 'stage1'}",
        f"optim.max_steps={STEPS}", "checkpoint.every_steps=4", "tracking.system_metrics=false", "optim.lr=1e-2",
        "batch.micro_batch_size=2",
    ]  # fmt: skip
    run_training(run_dir, "vlm_instruct_lora_tiny", overrides, nproc=2)
    assert consolidate([str(run_dir / "ckpt"), str(root / "hf"), "--verify", "--no-progress"]) == 0
    return root


def test_lora_instruction_tuning_trains_the_adapters_and_the_projector_alone(instructed: Path, tmp_path: Path) -> None:
    """vlm_instruct_lora (ZeRO-3, the llama2 template) from the stage-1 model: PEFT's LoRA adapters on every linear
    layer of the language model and the projector change, every base weight stays bit-identical; the checkpoint
    consolidates with its adapters (verified against DeepSpeed's gathering in the fixture) and merges."""
    run_dir = instructed / "lora"
    first, last = weights(run_dir, STEPS - 4), weights(run_dir, STEPS)
    changed = {name for name in first if not torch.equal(first[name], last[name])}
    adapters = {name for name in first if ".lora_A." in name or ".lora_B." in name}
    projector = {name for name in first if ".multi_modal_projector." in name}
    # 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B); never the head or the vision tower.
    assert len(adapters) == 28 and not any("lm_head" in n or "vision_tower" in n for n in adapters)
    assert changed == adapters | projector
    assert any(".base_layer." in name for name in first)  # the adapted layers' frozen weights, unchanged
    check_merge_and_adapter(instructed / "hf", instructed / "stage1", tmp_path)


def test_stage_three_stacks_an_adapter_and_answers_vqa_dialogues(
    corpus: dict[str, Path], instructed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vlm_finetune_lora (here under ZeRO-2) from the stage-2 model with previous_lora=stack: a new adapter and the
    projector train on VQA rewritten as dialogues while the stage-2 adapters stay frozen and active; held-out
    perplexity on the answers falls. Merged, the model beats the majority answer under biomedgpt-eval --task
    vqa_dialogue (greedy and beam) and answers biomedgpt-generate about a PNG."""
    from biomedgpt.cli.consolidate import main as consolidate
    from biomedgpt.cli.evaluate import main as evaluate
    from biomedgpt.cli.generate import main as generate
    from biomedgpt.cli.merge_lora import main as merge

    run_dir = tmp_path / "stage3"
    steps = 24
    overrides = [
        f"data.train={corpus['vqa_train']}", f"checkpoint.dir={run_dir / 'ckpt'}",
        f"model.init_from={instructed / 'hf'}",
        f"optim.max_steps={steps}", f"checkpoint.every_steps={steps // 2}", "tracking.system_metrics=false",
        "optim.lr=1e-2", "model.projector_lr=1e-3", "batch.micro_batch_size=2",
        f"validation.data={corpus['vqa_test']}", f"validation.every_steps={steps // 2}",
        "deepspeed_config=zero2_cpu.json",  # the LoRA stages under ZeRO-2 too (stage 2 runs under ZeRO-3)
    ]  # fmt: skip
    run_training(run_dir, "vlm_finetune_lora_tiny", overrides, nproc=2)
    # Perplexity of the held-out answers (assistant tokens only), validated halfway and at the end: it falls.
    checks = {r["step"]: r["val/perplexity"] for r in metric_records(run_dir) if "val/perplexity" in r}
    assert sorted(checks) == [steps // 2, steps] and checks[steps] < checks[steps // 2], checks
    first, last = weights(run_dir, steps // 2), weights(run_dir, steps)
    changed = {name for name in first if not torch.equal(first[name], last[name])}
    new = {name for name in first if ".lora_A.adapter_2." in name or ".lora_B.adapter_2." in name}
    previous = {name for name in first if ".lora_A.default." in name or ".lora_B.default." in name}
    assert len(new) == len(previous) == 28
    assert changed == new | {name for name in first if ".multi_modal_projector." in name}
    stage2 = weights(instructed / "lora", STEPS)  # the stacked adapters are stage 2's, untouched
    assert all(torch.equal(last[name], stage2[name]) for name in previous)

    hf, merged = tmp_path / "hf", tmp_path / "merged"
    assert consolidate([str(run_dir / "ckpt"), str(hf), "--no-progress"]) == 0
    assert merge([str(hf), str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["chat"]["template"] == "llama2"
    for beam in ("1", "3"):
        out = tmp_path / f"eval_beam{beam}"
        argv = ["--model", str(merged), "--task", "vqa_dialogue", "--data", str(corpus["vqa_test"]), "--out", str(out),
                "--beam", beam, "--max-len-b", "4", "--no-progress"]  # fmt: skip
        assert evaluate(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["count"] == 24 and metrics["majority_accuracy"] < 0.5, metrics
        assert metrics["accuracy"] > metrics["majority_accuracy"] + 0.2, metrics
        # The colour questions are learnt; the yes/no ones are reported apart (by the yes/no rule). The toy model
        # does not learn to read which question is asked in so few steps: no claim on their accuracy.
        assert metrics["open_count"] == 16 and metrics["closed_count"] == 8 and metrics["open_accuracy"] > 0.9, metrics
    capsys.readouterr()
    colour = "green"
    assert generate(["--model", str(merged), "--image", str(corpus["images"] / f"{colour}.png"), "--prompt", QUESTION,
                     "--beam", "1", "--max-len-b", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == colour


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
