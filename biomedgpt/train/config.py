"""The typed, nested run configuration of ``biomedgpt-train`` and its named presets.

The global batch size is the fixed quantity: gradient accumulation is derived from the micro-batch size and the
world size, so one config runs on 2 CPU ranks or 64 GPUs with the same optimisation.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from biomedgpt.tasks import TRAINING_TASKS

PRESET_DIR = Path(__file__).resolve().parent / "presets"
# Package data (setup.cfg), so that a wheel install finds them as the checkout does.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
# What data.task may say: the registry's tasks (biomedgpt/tasks.py), as a Literal for the config loader.
TrainingTask = Literal[TRAINING_TASKS]  # type: ignore[valid-type]
# The sizes of biomedgpt.model.config.MODEL_SIZES, spelt out: importing that module loads transformers (seconds),
# which loading a config, `--help` and the start checks must not wait for. A test keeps the two lists equal.
ModelSize = Literal["tiny", "medium", "base", "large", "xlarge"]


@dataclass
class ModelSection:
    size: ModelSize = "tiny"
    init_from: str | None = None  # a Hugging Face model directory (consolidated or imported) to start from
    # triton: the fused kernels of biomedgpt.kernels (CUDA GPUs; on CPU only under TRITON_INTERPRET=1, for tests)
    attention_backend: Literal["sdpa", "reference", "triton"] = "sdpa"
    resnet_norm: Literal["batch", "frozen", "sync"] = "batch"
    dropout: float = 0.1
    encoder_drop_path_rate: float = 0.1
    decoder_drop_path_rate: float = 0.1
    freeze_embedding: bool = False  # fine-tuning recipes freeze the shared embedding (and so the LM head)
    # Recompute activations in backward instead of keeping them: none, each encoder/decoder layer, or the layers
    # and each ResNet stage (biomedgpt/train/activation_checkpointing.py). Same losses and gradients, less memory.
    activation_checkpointing: Literal["none", "layers", "layers+resnet"] = "none"
    # torch.compile of each encoder/decoder layer (off by default: first steps pay the compilation, and the layers'
    # ZeRO-3 hooks break the graphs); apex's FusedLayerNorm on GPUs where apex is installed (else torch LayerNorm).
    compile_layers: bool = False
    apex_layer_norm: bool = True

    def __post_init__(self) -> None:
        if self.size not in get_args(ModelSize):
            raise ValueError(f"size={self.size!r}; choose one of {list(get_args(ModelSize))}")


@dataclass
class DataSection:
    task: TrainingTask = "pretrain"
    # Converted (Parquet + index.json) directories. Pretraining: vision_language drives the epoch, the others mix in.
    vision_language: str | None = None
    text: str | None = None
    image: str | None = None
    detection: str | None = None
    negative_samples: str | None = None  # folder with type2ans.json, object.txt, all_captions.txt
    train: str | None = None  # fine-tuning: converted training split
    # Fine-tuning: candidate answers (JSON list, or {answer: index} like the original ans2label files); VQA and
    # classification then train with trie constraints over them, as the original does.
    answers: str | None = None
    add_object: bool = False  # VQA: append " object: ..." from the objects column
    noise_ratio: float = 0.0  # summarization: share of decoder-input tokens replaced by random ones
    imagenet_normalization: bool = False  # classification (MedMNIST) normalises with ImageNet mean/std
    max_tgt_words: int = 30
    remote_root: str | None = None  # with a remote, the paths above are local cache folders
    tokenizer: str | None = None  # tokenizer folder; None = the small one shipped with the package (demo only)
    # The shipped 12,193-id tokenizer gives models that match no published checkpoint; runs other than the demo
    # must name data.tokenizer or opt in to it here (with a warning).
    allow_demo_tokenizer: bool = False
    patch_image_size: int = 256
    sample_patch_num: int | None = 196
    mixture_period: int = 8
    mixture_text: int = 2
    mixture_image: int = 1
    mixture_detection: int = 1
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int | None = 1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch_image_size % 16 or self.patch_image_size <= 0:
            raise ValueError(f"patch_image_size={self.patch_image_size} must be a positive multiple of 16")
        if self.task == "pretrain" and not self.vision_language:
            raise ValueError("pretraining needs data.vision_language (a converted directory)")
        if self.task != "pretrain" and not self.train:
            raise ValueError(f"fine-tuning task {self.task!r} needs data.train (a converted directory)")
        if self.answers and self.task not in ("vqa", "classification"):
            raise ValueError(f"data.answers constrains vqa or classification answers, not task {self.task!r}")


@dataclass
class OptimSection:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.01
    # After warmup: linear decay (the original's polynomial_decay) or cosine, down to min_lr_ratio x lr at max_steps.
    schedule: Literal["linear", "cosine"] = "linear"
    min_lr_ratio: float = 0.0
    clip_norm: float = 5.0
    label_smoothing: float = 0.0
    max_steps: int = 100
    # Captioning: after `drop_worst_after` updates, the highest-loss share of each micro-batch's target tokens is
    # left out of the loss (the original's --drop-worst-ratio/--drop-worst-after, 0.2/600 for PEIR Gross).
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0
    # Training loss fused with the tied output projection (biomedgpt/train/fused_loss.py): logits for at most
    # fused_loss_chunk_size target tokens exist at a time instead of [B, T, V]; same losses and gradients.
    # Validation and generation always compute real logits.
    fused_loss: bool = False
    fused_loss_chunk_size: int = 1024
    fused_adam: bool = True  # DeepSpeed's FusedAdam on GPUs (false: torch AdamW); CPU runs use torch AdamW

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if not 0.0 <= self.drop_worst_ratio < 1.0:
            raise ValueError(f"drop_worst_ratio={self.drop_worst_ratio} must lie in [0, 1)")
        if self.drop_worst_after < 0:
            raise ValueError(f"drop_worst_after={self.drop_worst_after} must be >= 0")
        if isinstance(self.fused_loss_chunk_size, bool) or self.fused_loss_chunk_size < 1:
            raise ValueError(
                f"optim.fused_loss_chunk_size={self.fused_loss_chunk_size} must be a positive number of target tokens"
            )

    def drop_worst_ratio_at(self, completed_steps: int) -> float:
        """The share of tokens dropped in the update after ``completed_steps`` updates."""
        return self.drop_worst_ratio if completed_steps > self.drop_worst_after else 0.0


@dataclass
class BatchSection:
    global_batch_size: int = 16  # rows (pretraining: vision-language rows) per optimizer step, all ranks together
    micro_batch_size: int = 4  # rows per rank per forward/backward

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")

    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x world size ({world_size}) = {per_step}; change batch.global_batch_size "
                f"or batch.micro_batch_size"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointSection:
    dir: str = "checkpoints/run"
    every_steps: int = 50
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in `dir` when there is one
    wall_clock_minutes: float | None = None  # save and exit 0 this long after start (before a SLURM limit)

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


@dataclass
class EmaSection:
    """Exponential moving average of the weights (the original VQA recipe: --ema-decay 0.9999, fp32, from update
    0). It is kept on each rank's ZeRO-3 partition, saved with every checkpoint and used for validation."""

    enabled: bool = False
    decay: float = 0.9999
    start_step: int = 0  # before this many updates the average just follows the weights

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay={self.decay} must lie in (0, 1)")
        if self.start_step < 0:
            raise ValueError(f"ema.start_step={self.start_step} must be >= 0")


@dataclass
class ValidationSection:
    """Periodic validation during fine-tuning with biomedgpt-eval's decoding and metrics; the best model by
    ``metric`` is written to ``<checkpoint.dir>/best`` (a model directory biomedgpt-eval/-generate read)."""

    data: str | None = None  # converted validation split; None: no validation
    every_steps: int = 500  # and after the last step
    metric: str | None = None  # None: the task's (vqa/nli/classification accuracy, caption cider, summary rougeL)
    limit: int | None = None  # validate on the first N rows only
    batch_size: int = 8
    beam: int | None = None  # None: the task's evaluation decoding
    max_len_b: int | None = None
    answer_types: str | None = None  # VQA: JSON question_id -> CLOSED/OPEN, adds the closed/open accuracies
    use_ema: bool = True  # with ema.enabled, validate (and keep as best) the averaged weights, as --ema-eval

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.batch_size < 1:
            raise ValueError("validation.every_steps and validation.batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"validation.limit={self.limit} must be >= 1 (or null for every row)")


@dataclass
class TrackingSection:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db
    experiment: str = "biomedgpt"
    run_name: str | None = None
    system_metrics: bool = True


@dataclass
class TrainConfig:
    """The run config of the ``biomedgpt`` recipe (the BiomedGPT / OFA encoder-decoder)."""

    recipe: Literal["biomedgpt"] = "biomedgpt"  # which recipe trains (biomedgpt/train/recipes)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    ema: EmaSection = field(default_factory=EmaSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed_config: str = "zero3_cpu.json"  # a file in biomedgpt/train/ds_configs/ or a path
    log_every_steps: int = 1
    peak_tflops: float | None = None  # device peak for MFU; None: look the device up in the table
    seed: int = 0
    # How long a collective waits for the slowest rank before the job fails; None: DeepSpeed's default (10 min, or
    # $DEEPSPEED_TIMEOUT). A checkpoint written to a slow shared filesystem or a long validation can need more.
    dist_timeout_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError("log_every_steps must be >= 1")
        if self.dist_timeout_minutes is not None and self.dist_timeout_minutes <= 0:
            raise ValueError(f"dist_timeout_minutes={self.dist_timeout_minutes} must be > 0 (or null for the default)")
        if self.validation.data is not None:
            from biomedgpt.tasks import PRETRAIN, finetune_task

            if self.data.task == PRETRAIN:
                raise ValueError("validation.data is for fine-tuning tasks; pretraining has no validation metric")
            task = finetune_task(self.data.task)
            metric = self.validation.metric or task.default_metric
            if metric not in task.metrics:
                raise ValueError(
                    f"validation.metric={metric!r} is not a {task.name} metric; choose one of {list(task.metrics)}"
                )


def load_run_config(source: Any, overrides: Sequence[str] = ()) -> Any:
    """The run config of ``source`` (a preset name, a YAML/JSON file or a dict) with ``key=value`` overrides, typed
    by the config class of the recipe it names (``recipe:``, default ``biomedgpt``)."""
    from biomedgpt.config_types import did_you_mean
    from biomedgpt.config_utils import ConfigError, load_config, load_raw_config
    from biomedgpt.train.recipes import DEFAULT_RECIPE, RECIPES, recipe_config_class

    presets = preset_paths()
    tree, origins = load_raw_config(source, overrides, presets=presets)
    name = tree.get("recipe", DEFAULT_RECIPE)
    if not isinstance(name, str) or name not in RECIPES:
        hint = did_you_mean(difflib.get_close_matches(str(name), sorted(RECIPES), n=1))
        raise ConfigError(
            f"unknown recipe {name!r} (from {origins.get('recipe', 'the config')}){hint}; choose one of "
            f"{', '.join(sorted(RECIPES))}"
        )
    return load_config(recipe_config_class(name), source, overrides, presets=presets)


def preset_paths() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PRESET_DIR.glob("*.yaml"))}


def deepspeed_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = DS_CONFIG_DIR / name_or_path
    if candidate.is_file():
        return candidate
    available = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
    raise FileNotFoundError(f"DeepSpeed config {name_or_path!r} not found; give a path or one of {available}")
