"""Distributed set-up, the DeepSpeed config, optimizer and schedule around a recipe's model: everything before the
first step."""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from biomedgpt.runtime.build_tools import prefer_environment_ninja
from biomedgpt.runtime.launcher_env import DistributedEnv, apply_distributed_env
from biomedgpt.train.config import TrainConfig, deepspeed_config_path

AUTO = "auto"


@dataclass
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float | None = None) -> DistributedContext:
    """Map the launcher's variables (torchrun, deepspeed, srun) and start the process group (gloo on CPU).

    ``timeout_minutes`` bounds how long a collective waits for the slowest rank (None: DeepSpeed's default).
    """
    env: DistributedEnv = apply_distributed_env()
    prefer_environment_ninja()  # before DeepSpeed builds or loads its ops: see runtime.build_tools
    import deepspeed

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **timeout)
    device = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    return DistributedContext(env.rank, env.local_rank, env.world_size, device, backend)


def resolve_deepspeed_config(config: TrainConfig, world_size: int, cuda: bool | None = None) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill its ``"auto"`` entries from the run config (the single source of truth
    for batch sizes, clipping and precision); concrete values that contradict the run config are errors."""
    path = deepspeed_config_path(config.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    cuda = torch.cuda.is_available() if cuda is None else cuda
    accumulation = config.batch.gradient_accumulation(world_size)
    wanted = {
        "train_batch_size": config.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": config.batch.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": config.optim.clip_norm,
    }
    for key, value in wanted.items():
        current = ds.get(key, AUTO)
        if current == AUTO:
            ds[key] = value
        elif float(current) != float(value):
            raise ValueError(
                f'{path}: {key}={current} contradicts the run config ({value}); set it to "auto" in the JSON'
            )
    bf16 = config.precision == "bf16"
    section = ds.setdefault("bf16", {"enabled": AUTO})
    if section.get("enabled", AUTO) == AUTO:
        section["enabled"] = bf16
    elif bool(section["enabled"]) != bf16:
        raise ValueError(
            f"{path} has bf16.enabled={section['enabled']} but precision={config.precision}; "
            f"set precision={'bf16' if section['enabled'] else 'fp32'} or use another DeepSpeed config"
        )
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{path}: fp16 is not supported (use bf16 on GPUs that have it, fp32 elsewhere)")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none") and not cuda:
        raise ValueError(f"{path} offloads the optimizer to CPU, which needs a GPU run; use zero3_cpu.json on CPU")
    if bf16 and not cuda:
        # DeepSpeed's CPU accelerator supports bf16 (bf16 module weights, fp32 master partitions in the optimizer):
        # correct, but CPUs without bf16 matrix units run it slower than fp32.
        warnings.warn(
            "precision=bf16 on CPU: DeepSpeed's CPU accelerator trains in bf16 correctly but usually slower than "
            "fp32 (zero3_cpu_bf16.json is the CPU config); use precision=fp32 for speed",
            UserWarning,
            stacklevel=2,
        )
    ds.setdefault("steps_per_print", 1_000_000_000)
    return ds


def check_attention_backend(config: TrainConfig, cuda: bool | None = None) -> None:
    """Refuse, before any process group starts, an attention backend this machine cannot run (a ValueError naming
    ``model.attention_backend`` and the fix); the kernels themselves would fail only at the first forward."""
    if config.model.attention_backend != "triton":
        return
    from biomedgpt.kernels.attention import interpreting, triton_available

    if not triton_available():
        raise ValueError(
            "model.attention_backend=triton needs the triton package (pip install triton; CUDA builds of torch ship "
            "it); set model.attention_backend=sdpa on this machine"
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda and not interpreting():
        raise ValueError(
            "model.attention_backend=triton runs its kernels on CUDA GPUs and there is none here; on CPU they run "
            "only under Triton's interpreter (TRITON_INTERPRET=1, slow, for tests); set model.attention_backend=sdpa"
        )


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str = "linear", min_lr_ratio: float = 0.0
) -> float:
    """The learning-rate multiplier after ``step`` completed updates: linear warmup (the first update already at
    1/warmup), then ``linear`` decay (fairseq's polynomial_decay with power 1, BiomedGPT's schedule) or ``cosine``
    decay (half a cosine, as BioMedGPT-LM and LLaMA train) from 1 to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step <= warmup_steps:
        return max(step, 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(
    parameter_groups: list[dict[str, Any]], config: Any, ds_config: dict[str, Any]
) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay over the recipe's parameter groups (a group may set its own
    ``weight_decay``): FusedAdam on GPU (``optim.fused_adam``), DeepSpeed's CPU Adam when the optimizer is
    offloaded, torch AdamW otherwise."""
    optim = config.optim
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameter_groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available() and config.optim.fused_adam:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(parameter_groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(parameter_groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    optim = config.optim
    total, warmup = optim.max_steps, math.ceil(optim.warmup_ratio * optim.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, optim.schedule, optim.min_lr_ratio)
    )


def initialize_engine(config: Any, context: DistributedContext, recipe: Any) -> tuple[Any, dict[str, Any]]:
    """The DeepSpeed engine (the recipe's model, its optimizer and schedule wrapped) and the resolved DeepSpeed
    config."""
    import deepspeed

    ds_config = resolve_deepspeed_config(config, context.world_size)
    model = recipe.build_model(ds_config)
    optimizer = build_optimizer(recipe.parameter_groups(model), config, ds_config)
    scheduler = build_scheduler(optimizer, config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=copy.deepcopy(ds_config)
    )
    return engine, ds_config


def model_state_bytes_per_rank(
    num_parameters: int,
    stage: int,
    world_size: int,
    bf16: bool,
    largest_layer_parameters: int = 0,
    trainable_parameters: int | None = None,
) -> dict[str, float]:
    """Memory of model states per rank (weights, gradients, Adam moments + fp32 master copy), ZeRO paper terms.

    bf16: 2 B weights + 2 B grads + 12 B optimizer (fp32 master, m, v); fp32: 4 + 4 + 8. Under ZeRO-3 as
    DeepSpeed's ``estimate_zero3_model_states_mem_needs`` counts it: a bf16 run keeps its reduced gradient partition
    in fp32 for the optimizer (4 B, so 18 B per parameter in all), and the largest layer is gathered whole with its
    gradient while it computes (``largest_layer_parameters`` x twice the weight bytes). Gradients and optimizer
    states exist for the ``trainable_parameters`` only (default: all).
    """
    weight, grad, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    if stage >= 3 and bf16:
        grad = 4
    n = float(num_parameters)
    shard = max(world_size, 1)
    weights = n * weight / (shard if stage >= 3 else 1)
    trained = float(num_parameters if trainable_parameters is None else trainable_parameters)
    grads = trained * grad / (shard if stage >= 2 else 1)
    optimizer = trained * optim / (shard if stage >= 1 else 1)
    memory = {"weights": weights, "gradients": grads, "optimizer": optimizer}
    if stage >= 3:
        memory["largest layer gathered"] = float(largest_layer_parameters * 2 * weight)
    return {**memory, "total": sum(memory.values())}


def largest_layer_parameters(model: torch.nn.Module) -> int:
    """Parameters of the module holding the most of its own (not its children's): what ZeRO-3 gathers at once."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
