"""LoRA stages of the vision_chat recipe in process: a stage-3 start from a model that holds adapters (merged into
the weights, or kept under a new adapter on top), biomedgpt-merge-lora on stacked adapters (merged logits, PEFT's
own loading of the exported adapters, the non-LoRA trainables the run declared) and the QLoRA refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from biomedgpt.model.vision_chat import add_lora, build_vision_chat_model, lora_adapters, vision_chat_config
from biomedgpt.train.recipes.vision_chat import VisionChatRecipe, apply_trainable

VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
LANGUAGE = {"model_type": "llama", "vocab_size": 3008, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
ZERO2 = {"zero_optimization": {"stage": 2}}


def randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    """PEFT starts lora_B at zero (the adapter changes nothing); trained adapters do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def save_model(model: torch.nn.Module, directory: Path) -> Path:
    """What biomedgpt-consolidate writes for a vision_chat run: config.json and the weights, adapters unmerged."""
    from transformers import LlamaTokenizerFast

    directory.mkdir()
    model.config.save_pretrained(directory)
    LlamaTokenizerFast(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def batch(config: object) -> dict[str, torch.Tensor]:
    from biomedgpt.checkpoint.model_formats import VisionChatFormat

    return VisionChatFormat().dummy_batch(config)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A model with one trained adapter (stage 2), saved, and its logits."""
    torch.manual_seed(0)
    model = build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, image_token_id=3000))
    assert add_lora(model, r=4, alpha=8, dropout=0.0) == "default"
    randomise_adapters(model, 1)
    with torch.no_grad():
        logits = model.eval()(**batch(model.config)).logits
    return save_model(model, tmp_path_factory.mktemp("stage2") / "model"), logits


def load(directory: Path, previous_lora: str) -> torch.nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return VisionChatRecipe._load_previous_stage(str(directory), config, ZERO2, previous_lora)


def test_stage_three_from_merged_adapters(stage2: tuple[Path, torch.Tensor]) -> None:
    model = load(stage2[0], "merge").eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert lora_adapters(model.config) == []
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(model.config)).logits, stage2[1], rtol=0, atol=1e-5)


def test_stage_three_stacks_a_new_adapter_on_the_kept_one(stage2: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    """The stage-2 adapter stays active and frozen; the new one starts at zero (the model's logits unchanged) and is
    the only LoRA part that trains. biomedgpt-merge-lora then folds both in, and exports each as PEFT saves it."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from biomedgpt.checkpoint.merge_lora import merge_lora

    model = load(stage2[0], "stack")
    name = add_lora(model, r=2, alpha=4, dropout=0.0)
    assert name == "adapter_2" and [a["name"] for a in lora_adapters(model.config)] == ["default", "adapter_2"]
    trainable = apply_trainable(model, ["model.multi_modal_projector.*", "lm_head.*", "*.lora_A.adapter_2.*",
                                        "*.lora_B.adapter_2.*"])  # fmt: skip
    assert not any(".default." in n for n in trainable) and sum(".adapter_2." in n for n in trainable) == 28
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch(model.config)).logits, stage2[1], rtol=0, atol=1e-6)
    randomise_adapters(model, 2)  # both adapters now differ from zero: "trained"
    model.config.trainable = ["model.multi_modal_projector.*", "lm_head.*"]
    with torch.no_grad():
        stacked = model(**batch(model.config)).logits
    assert not torch.allclose(stacked, stage2[1], atol=1e-3)

    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapters"
    result = merge_lora(save_model(model, tmp_path / "stage3"), merged_dir, adapter_dir)
    assert result.merged_layers == 14  # 2 layers x (q, k, v, o, gate, up, down), each with both adapters
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert "lora" not in json.loads((merged_dir / "config.json").read_text())
    trainables = load_file(adapter_dir / "non_lora_trainables.safetensors")
    assert sorted(trainables) == sorted(n for n, _ in model.named_parameters() if n.startswith(("model.multi", "lm_")))
    # PEFT loads what was exported: the stage-2 base with both adapters active gives the stacked logits.
    base = build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, image_token_id=3000))
    base.load_state_dict(merged.state_dict())  # any weights: the adapters' base layers are overwritten below
    saved = load_file(tmp_path / "stage3" / "model.safetensors")
    base_weights = {k.replace(".base_layer", ""): v for k, v in saved.items() if ".lora_" not in k}
    base.load_state_dict(base_weights)
    peft = PeftModel.from_pretrained(base, adapter_dir)
    peft.load_adapter(adapter_dir / "adapter_2", adapter_name="adapter_2")
    peft.base_model.set_adapter(["default", "adapter_2"])
    with torch.no_grad():
        batch_inputs = batch(merged.config)
        torch.testing.assert_close(merged(**batch_inputs).logits, stacked, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft.eval()(**batch_inputs).logits, stacked, rtol=0, atol=1e-5)


def test_qlora_is_refused_clearly_where_it_cannot_run() -> None:
    """The recipe's environment check (biomedgpt-train runs it before any process group): no model to quantize,
    ZeRO-3, and (on a machine without CUDA, as this one) no GPU."""
    from biomedgpt.train.cli import load_run_config
    from biomedgpt.train.recipes.vision_chat_config import LoraSection

    def refusal(*overrides: str) -> str:
        config = load_run_config("vlm_instruct_lora_tiny", ["model.lora.quantize=4bit", *overrides])
        with pytest.raises(ValueError) as caught:
            VisionChatRecipe.check_environment(config)
        return str(caught.value)

    parts = ("model.vision_config={model_type: clip_vision_model}", "model.language_config={model_type: llama}")
    assert "set model.init_from" in refusal("model.init_from=null", *parts, "data.tokenizer=t")
    assert "ZeRO-3 does not partition the 4-bit weights" in refusal()
    if not torch.cuda.is_available():
        assert "runs on CUDA GPUs only" in refusal("deepspeed_config=zero2_cpu.json")
    VisionChatRecipe.check_environment(load_run_config("vlm_instruct_lora_tiny", []))  # no quantize: nothing to check
    with pytest.raises(ValueError, match=r"4bit \(QLoRA\) or null"):
        LoraSection(quantize="8bit")


def test_qlora_loads_the_language_model_in_4bit_and_trains_adapters_on_it(stage2: tuple[Path, torch.Tensor]) -> None:
    """model.lora.quantize=4bit from a merged stage-2 model: every linear layer of the language model is stored as
    bitsandbytes' 4-bit NF4 (the tower, projector and head are not), LoRA adapters go on those layers, and a backward
    pass reaches only the adapters and the projector. bitsandbytes quantizes on CPU too, which this runs on; the
    training job itself is for CUDA (refused here, above)."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from transformers import LlavaConfig

    from biomedgpt.cli.merge_lora import main as merge
    from biomedgpt.model.vision_chat import lora_parameter_patterns, lora_targets

    merged = stage2[0].parent / "merged_for_qlora"
    if not merged.exists():
        assert merge([str(stage2[0]), str(merged)]) == 0
    config = LlavaConfig.from_pretrained(merged)
    config.text_config._attn_implementation = "sdpa"
    model = VisionChatRecipe._load_previous_stage(str(merged), config, ZERO2, "merge", quantize="4bit")
    quantized = {name for name, module in model.named_modules() if isinstance(module, Linear4bit)}
    assert quantized == set(lora_targets(model)) and len(quantized) == 14
    assert all(model.get_parameter(f"{name}.weight").dtype == torch.uint8 for name in quantized)  # packed 4-bit
    assert not any("vision_tower" in n or "projector" in n or "lm_head" in n for n in quantized)
    name = add_lora(model, r=4, alpha=8, dropout=0.0)
    apply_trainable(model, ["model.multi_modal_projector.*", *lora_parameter_patterns(name)])
    with torch.no_grad():
        full = VisionChatRecipe._load_previous_stage(str(merged), config, ZERO2, "merge").eval()
        reference = full(**batch(config)).logits
    logits = model(**batch(config)).logits.float()
    assert (logits - reference).abs().max() < 0.5  # 4-bit weights and bf16 compute: close, not equal
    logits.sum().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached and all(".lora_" in n or ".multi_modal_projector." in n for n in reached)
    assert any(".lora_A." in n for n in reached) and any(".multi_modal_projector." in n for n in reached)


def test_lora_targets_name_the_layers_to_adapt() -> None:
    """model.lora.targets keeps only the named layers (by last or full name); a name matching none is refused with the
    layers there are; without targets, every linear layer of the language model but the head."""
    from biomedgpt.model.vision_chat import lora_targets

    model = build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, image_token_id=3000))
    every = lora_targets(model)
    assert len(every) == 14 and not any("lm_head" in name or "projector" in name for name in every)
    chosen = lora_targets(model, include=["q_proj", "*.layers.1.mlp.down_proj"])
    assert chosen == [name for name in every if name.endswith("q_proj")] + [
        "model.language_model.layers.1.mlp.down_proj"
    ]
    assert lora_targets(model, exclude=("*.layers.0.*",), include=["q_proj"]) == [
        "model.language_model.layers.1.self_attn.q_proj"
    ]
    with pytest.raises(ValueError, match=r"qproj match no linear layer .*\(its layers: down_proj, gate_proj"):
        lora_targets(model, include=["q_proj", "qproj"])
    add_lora(model, r=2, alpha=4, dropout=0.0, targets=chosen)
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert adapted == set(chosen)
