import math
import sys

import pytest
import yaml

from biomedgpt.config_utils import ConfigError, load_config
from biomedgpt.train.cli import main
from biomedgpt.train.config import TrainConfig, preset_paths
from biomedgpt.train.engine import lr_factor, model_state_bytes_per_rank, resolve_deepspeed_config


def demo(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, "demo", list(overrides), presets=preset_paths())


def test_every_preset_loads_and_plans(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where none of the presets' relative data paths exist
    assert {"demo", "pretrain_tiny", "pretrain_medium", "pretrain_base", "pretrain_large", "pretrain_xlarge"} <= set(
        preset_paths()
    )
    outs, errs = [], []
    for name in preset_paths():
        # The presets' data paths are placeholders: planning without them is what --allow-missing-data is for.
        world_size = "8" if name != "demo" else "2"
        code = main(["--config", name, "--dry-run", "--world-size", world_size, "--allow-missing-data"])
        printed = capsys.readouterr()
        outs.append(printed.out)
        errs.append(printed.err)
        # A later stage: its plan is the previous stage's model, not there.
        if name in ("vlm_instruct_lora_tiny", "vlm_finetune_lora_tiny", "vlm_finetune_full_tiny"):
            assert code == 2 and "the previous stage's model" in printed.err
            continue
        assert code == 0, name
    out, err = "".join(outs), "".join(errs)
    assert "size xlarge" in out and "ZeRO stage 3" in out and '"train_batch_size": 256' in out
    assert "data.vision_language=data/converted/vision_language" in err  # reported, not ignored


def test_unknown_key_is_named_with_a_suggestion(capsys):
    assert main(["--config", "demo", "--dry-run", "optim.lrr=1e-4"]) == 2
    assert "unknown key 'optim.lrr' (from command line); did you mean 'optim.lr'?" in capsys.readouterr().err


def test_gradient_accumulation_is_derived_and_checked():
    config = demo("batch.global_batch_size=16", "batch.micro_batch_size=4")
    assert config.batch.gradient_accumulation(1) == 4
    assert config.batch.gradient_accumulation(2) == 2
    ds = resolve_deepspeed_config(config, world_size=2, cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        4,
        2,
    )
    assert ds["gradient_clipping"] == config.optim.clip_norm
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        config.batch.gradient_accumulation(3)


def test_impossible_combinations_fail_before_work():
    with pytest.warns(UserWarning, match="precision=bf16 on CPU"):  # slow there, but DeepSpeed runs it
        ds = resolve_deepspeed_config(demo("precision=bf16", "deepspeed_config=zero3_cpu_bf16.json"), 2, cuda=False)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="bf16.enabled=True but precision=fp32"):
        resolve_deepspeed_config(demo("deepspeed_config=zero3_bf16.json"), 2, cuda=True)
    with pytest.raises(ValueError, match="offloads the optimizer"):
        resolve_deepspeed_config(demo("precision=bf16", "deepspeed_config=zero3_offload.json"), 2, cuda=False)
    with pytest.raises(FileNotFoundError, match="zero3_cpu.json"):
        resolve_deepspeed_config(demo("deepspeed_config=nope.json"), 2, cuda=False)
    with pytest.raises(ConfigError, match="precision"):
        demo("precision=fp16")


def test_learning_rate_schedule_matches_fairseq_polynomial_decay():
    # warmup 4 of 20 updates: the first update already uses lr/4, peak at update 4, zero at 20.
    factors = [lr_factor(step, 4, 20) for step in range(21)]
    assert factors[:5] == [0.25, 0.25, 0.5, 0.75, 1.0]
    assert factors[12] == pytest.approx(1 - 8 / 16)
    assert factors[20] == 0.0
    assert lr_factor(0, 0, 10) == 1.0


def test_cosine_schedule_falls_to_the_floor_along_half_a_cosine() -> None:
    # warmup 2 of 12 updates, then half a cosine from 1 to 0.1 over the remaining 10.
    factors = [lr_factor(step, 2, 12, "cosine", 0.1) for step in range(13)]
    assert factors[:3] == [0.5, 0.5, 1.0]
    assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: the mean of peak and floor
    assert factors[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert factors[12] == 0.1 and all(a >= b for a, b in zip(factors[2:], factors[3:]))
    from biomedgpt.train.config import OptimSection

    optim = load_config(OptimSection, None, ["schedule=cosine", "min_lr_ratio=0.1"])
    assert (optim.schedule, optim.min_lr_ratio) == ("cosine", 0.1)
    with pytest.raises(ConfigError, match=r"min_lr_ratio=2.0 must lie in \[0, 1\]"):
        load_config(OptimSection, None, ["min_lr_ratio=2"])


def test_model_state_memory_follows_the_zero_stages():
    one_billion = 10**9
    stage0 = model_state_bytes_per_rank(one_billion, 0, 8, bf16=True)
    stage3 = model_state_bytes_per_rank(one_billion, 3, 8, bf16=True, largest_layer_parameters=10**8)
    assert stage0["total"] == 16e9  # 2 + 2 + 12 bytes per parameter
    assert stage3["total"] == 18e9 / 8 + 4e8  # DeepSpeed's 18 bytes, plus the largest layer gathered with its grad
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(one_billion, 10**8, num_gpus_per_node=8, cpu_offload=False)
    assert stage3["total"] == gpu_bytes
    assert model_state_bytes_per_rank(one_billion, 2, 4, bf16=False)["weights"] == 4e9


def test_fine_tuning_recipes_and_validation_settings_are_checked():
    def finetune(name: str, *overrides: str) -> TrainConfig:
        return load_config(TrainConfig, name, list(overrides), presets=preset_paths())

    vqa = finetune("finetune_vqa")
    assert vqa.ema.enabled and vqa.ema.decay == 0.9999 and vqa.validation.use_ema
    caption = finetune("finetune_caption")
    assert (caption.optim.drop_worst_ratio, caption.optim.drop_worst_after) == (0.2, 600)
    assert caption.validation.metric == "cider" and caption.validation.beam == 5
    with pytest.raises(ValueError, match="validation.metric='bleu' is not a caption metric; choose one of"):
        finetune("finetune_caption", "validation.metric=bleu")
    with pytest.raises(ValueError, match="validation.data is for fine-tuning tasks"):
        demo("validation.data=somewhere")
    with pytest.raises(ValueError, match=r"drop_worst_ratio=1.0 must lie in \[0, 1\)"):
        finetune("finetune_caption", "optim.drop_worst_ratio=1.0")
    with pytest.raises(ValueError, match=r"ema.decay=1.0 must lie in \(0, 1\)"):
        finetune("finetune_vqa", "ema.decay=1.0")


def test_the_triton_backend_is_checked_at_start_and_named_in_the_error(monkeypatch):
    from biomedgpt.train.engine import check_attention_backend

    config = demo("model.attention_backend=triton")
    assert config.model.attention_backend == "triton"
    check_attention_backend(demo(), cuda=False)  # sdpa needs nothing
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton runs its kernels on CUDA GPUs.*TRITON_INTERPRET"):
        check_attention_backend(config, cuda=False)
    check_attention_backend(config, cuda=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_attention_backend(config, cuda=False)  # the interpreter runs the kernels on CPU
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(ValueError, match="needs the triton package.*model.attention_backend=sdpa"):
        check_attention_backend(config, cuda=True)
    with pytest.raises(ConfigError, match="attention_backend"):
        demo("model.attention_backend=flash")


def test_memory_and_speed_switches_are_named_in_the_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    switches = {
        "model.activation_checkpointing": "layers+resnet",
        "model.compile_layers": "true",
        "model.apex_layer_norm": "false",
        "optim.fused_loss": "true",
        "optim.fused_loss_chunk_size": "512",
        "optim.fused_adam": "false",
    }
    overrides = [f"{key}={value}" for key, value in switches.items()]
    assert main(["--config", "demo", "--dry-run", "--allow-missing-data", *overrides]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("# resolved config")[1].split("# DeepSpeed config")[0])
    for key, value in switches.items():
        section, name = key.split(".")
        assert resolved[section][name] == yaml.safe_load(value), key
    defaults = demo()
    assert (defaults.model.activation_checkpointing, defaults.model.compile_layers) == ("none", False)
    assert (defaults.optim.fused_loss, defaults.optim.fused_adam, defaults.model.apex_layer_norm) == (False, True, True)
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        demo("model.activation_checkpointing=everything")


def test_recipe_selects_the_config_class_and_unknown_recipes_are_named() -> None:
    from biomedgpt.config_utils import ConfigError
    from biomedgpt.train.config import TrainConfig, load_run_config
    from biomedgpt.train.recipes import recipe_class

    config = load_run_config("demo", ["optim.lr=1e-3"])
    assert type(config) is TrainConfig and config.recipe == "biomedgpt" and config.optim.lr == 1e-3
    assert recipe_class(config.recipe).name == "biomedgpt"
    with pytest.raises(ConfigError, match=r"unknown recipe 'biomedgt' \(from command line\); did you mean 'biomedgpt'"):
        load_run_config("demo", ["recipe=biomedgt"])
