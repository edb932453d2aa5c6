"""Training-step throughput, model FLOPs utilisation (MFU) and peak memory of BiomedGPT under DeepSpeed.

For each model size and each variant (attention x loss x ZeRO stage x activation checkpointing) one DeepSpeed
engine trains on one synthetic batch shaped like pretraining (a 384 px image with 196 of its 576 patches kept,
64 text tokens, 32 target tokens; flags change them): ``--warmup`` untimed steps, then ``--steps`` timed ones.

- ``eager`` = ``attention_backend=sdpa`` (dense bias as the attention mask) + the plain loss over [B, T, V] logits;
  ``fused`` = ``attention_backend=triton`` (biomedgpt.kernels) + the fused chunked loss (optim.fused_loss).
- FLOPs: one training step (forward + backward) of the plain model, outside DeepSpeed, counted once per size
  with ``torch.utils.flop_counter.FlopCounterMode`` (it cannot run inside a ZeRO-3 engine, see
  biomedgpt/train/flops.py), with the ``reference`` attention and the plain loss and no activation checkpointing,
  so every variant is charged the same model FLOPs (recomputation and kernel choice are not model work).
  ``biomedgpt.train.flops.training_flops`` gives the formula's count; both are reported.
- MFU = counted FLOPs per step x steps/s / peak, the peak from biomedgpt.train.metrics.DEVICE_PEAK_TFLOPS (dense,
  by precision) or ``--peak-tflops``; on CPU there is no peak unless given, and MFU is null.
- Memory: ``torch.cuda.max_memory_allocated`` of the variant on GPU. On CPU ``peak_memory_bytes`` is the peak of
  torch's allocator during one extra, profiled step above what was held before it (activations, gradients,
  temporaries; ``biomedgpt.train.memory_profile``), the part activation checkpointing and the fused loss reduce; the
  process's resident-set high-water mark (``rss_high_water_bytes``, never goes down, so the highest so far) and this
  variant's rise of it (``rss_growth_bytes``) are recorded too.
- Precision: bf16 on GPU (DeepSpeed's bf16: bf16 weights, fp32 master partitions), fp32 on CPU.
- A variant that fails (out of memory, triton missing, a kernel error) is recorded with its error in the JSON; the
  other variants still run. Exit status 1 when any variant failed.

The triton kernels run on a CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` from process start);
there they are orders of magnitude slower than compiled, so CPU times of ``fused`` say nothing about GPU speed.

Run (CPU, the numbers in docs/benchmarks.md)::

    python benchmarks/train_step.py --sizes tiny,medium --variants eager --json out.json --markdown out.md

GPU (one H100/H200)::

    python benchmarks/train_step.py --sizes base,large,xlarge --variants eager,fused --zero 2,3 --ckpt none,layers

``--save-checkpoint DIR`` saves the engine after the timed steps and then runs ``--after-save-steps`` more steps,
recording their losses; ``--resume DIR`` loads that checkpoint first and records the losses of the steps it runs;
``--consolidate OUT`` (with ``--resume``) writes the checkpoint as a Hugging Face model directory with
biomedgpt.checkpoint.consolidate and checks its weights equal the resumed engine's. These need one size and one
variant. Synthetic data only: no mosaicml-streaming or MLflow is imported.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import platform
import resource
import socket
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from biomedgpt.model.config import MODEL_SIZES, ORIGINAL_VOCAB_SIZE, BiomedGPTConfig
from biomedgpt.train.flops import forward_flops, training_flops
from biomedgpt.train.memory_profile import peak_allocated_bytes

VARIANTS = {"eager": ("sdpa", "plain"), "fused": ("triton", "fused")}
ATTENTIONS = ("sdpa", "reference", "triton")
LOSSES = ("plain", "fused")
CHECKPOINTING = ("none", "layers", "layers+resnet")
PAD, BOS, EOS, FIRST_TOKEN = 1, 0, 2, 4
LABEL_SMOOTHING = 0.1
SEED = 1234


@dataclass(frozen=True)
class Variant:
    size: str
    attention: str
    loss: str
    zero: int
    ckpt: str

    @property
    def name(self) -> str:
        return f"{self.size}/{self.attention}+{self.loss}/zero{self.zero}/ckpt={self.ckpt}"


def csv(kind: type, choices: tuple | None = None):  # noqa: ANN201 - an argparse type
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {list(choices or [])}")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=csv(str, tuple(MODEL_SIZES)), default=["tiny"], help="e.g. tiny,medium")
    p.add_argument("--variants", type=csv(str, tuple(VARIANTS)), default=None, help="eager,fused (default both)")
    p.add_argument("--attention", type=csv(str, ATTENTIONS), help="attention backends (instead of --variants)")
    p.add_argument("--loss", type=csv(str, LOSSES), help="losses (with --attention; default plain)")
    p.add_argument("--zero", type=csv(int, (2, 3)), default=[2, 3], help="ZeRO stages (default 2,3)")
    p.add_argument("--ckpt", type=csv(str, CHECKPOINTING), default=["none", "layers"], help="activation ckpt")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--image-size", type=int, default=384, help="image side in pixels, 0 for text only (384)")
    p.add_argument("--patches", type=int, default=196, help="image patches kept per example (default 196)")
    p.add_argument("--text-len", type=int, default=64, help="source text tokens (default 64)")
    p.add_argument("--target-len", type=int, default=32, help="target tokens (default 32)")
    p.add_argument("--vocab", default=str(ORIGINAL_VOCAB_SIZE), help="vocabulary size, or 'tokenizer' (default "
                   "59457; 'tokenizer' = the packaged tokenizer's, which --consolidate needs)")  # fmt: skip
    p.add_argument("--dropout", type=float, default=0.1, help="dropout and drop-path rates (default 0.1)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default 1e-4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: the device table)")
    p.add_argument("--no-flop-count", action="store_true", help="skip FlopCounterMode (use the formula for MFU)")
    p.add_argument("--save-checkpoint", type=Path, metavar="DIR", help="save after the timed steps")
    p.add_argument("--after-save-steps", type=int, default=2, help="steps after the save, losses recorded")
    p.add_argument("--resume", type=Path, metavar="DIR", help="load this checkpoint before the steps")
    p.add_argument("--consolidate", type=Path, metavar="OUT", help="with --resume: consolidate and compare")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write a markdown table here")
    args = p.parse_args(argv)
    if args.attention is None:
        if args.loss is not None:
            p.error("--loss needs --attention (or use --variants eager,fused)")
        args.pairs = [VARIANTS[v] for v in (args.variants or list(VARIANTS))]
    else:
        if args.variants is not None:
            p.error("give --variants or --attention/--loss, not both")
        args.pairs = list(itertools.product(args.attention, args.loss or ["plain"]))
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    if args.vocab == "tokenizer":
        from biomedgpt.tokenizer import BiomedGPTTokenizer

        args.vocab = len(BiomedGPTTokenizer.default())
    else:
        try:
            args.vocab = int(args.vocab)
        except ValueError:
            p.error(f"--vocab {args.vocab!r}: give an integer or 'tokenizer'")
    single = len(args.sizes) == 1 and len(args.pairs) == 1 and len(args.zero) == 1 and len(args.ckpt) == 1
    if (args.save_checkpoint or args.resume) and not single:
        p.error("--save-checkpoint / --resume need exactly one size, variant, --zero and --ckpt")
    if args.consolidate and not args.resume:
        p.error("--consolidate needs --resume DIR (the checkpoint to consolidate)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    return args


# ---------------------------------------------------------------------------------------------------- set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: str) -> None:
    """World size 1 unless a launcher set the variables: DeepSpeed needs a process group even then."""
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed reads these at engine creation too, so they are set even when a process group already runs.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)


def model_config(args: argparse.Namespace, size: str, attention: str) -> BiomedGPTConfig:
    return BiomedGPTConfig.for_size(
        size,
        vocab_size=args.vocab,
        attention_backend=attention,
        dropout=args.dropout,
        encoder_drop_path_rate=args.dropout,
        decoder_drop_path_rate=args.dropout,
    )


def synthetic_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens and pixels shaped like a pretraining micro-batch (the same batch every step)."""
    gen = torch.Generator().manual_seed(SEED)
    b = args.batch
    source = torch.randint(FIRST_TOKEN, args.vocab, (b, args.text_len), generator=gen)
    source[:, 0], source[:, -1] = BOS, EOS
    target = torch.randint(FIRST_TOKEN, args.vocab, (b, args.target_len), generator=gen)
    target[:, -1] = EOS
    decoder_input = torch.cat([torch.full((b, 1), BOS), target[:, :-1]], dim=1)
    batch = {"input_ids": source, "decoder_input_ids": decoder_input, "target": target}
    if args.image_size:
        batch["patch_images"] = torch.randn(b, 3, args.image_size, args.image_size, generator=gen)
        batch["patch_masks"] = torch.ones(b, dtype=torch.bool)
        grid = ((args.image_size + 15) // 16) ** 2
        if args.patches < grid:  # each example keeps its own sorted subset, as pretraining's patch sampling
            batch["patch_indices"] = torch.stack(
                [torch.randperm(grid, generator=gen)[: args.patches].sort().values for _ in range(b)]
            )
    return {k: v.to(device) for k, v in batch.items()}


def kept_patches(args: argparse.Namespace) -> int:
    if not args.image_size:
        return 0
    return min(args.patches, ((args.image_size + 15) // 16) ** 2)


def tokens_per_step(args: argparse.Namespace) -> int:
    """Encoder positions (kept patches + text) plus decoder positions, over the batch."""
    return args.batch * (kept_patches(args) + args.text_len + args.target_len)


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_kind: str) -> torch.Tensor:
    """The per-token loss of the batch, as the trainer computes it (biomedgpt/train/recipes/biomedgpt.py)."""
    import functools

    from biomedgpt.train.fused_loss import fused_loss_parts, loss_output_from_parts
    from biomedgpt.train.loss import label_smoothed_cross_entropy

    inputs = {k: v for k, v in batch.items() if k != "target"}
    weights = torch.ones(batch["target"].shape[0], device=batch["target"].device)
    loss_args = dict(epsilon=LABEL_SMOOTHING, padding_idx=PAD, example_weights=weights)
    if loss_kind == "fused":
        part = functools.partial(fused_loss_parts, target=batch["target"], **loss_args)
        out = loss_output_from_parts(model(**inputs, hidden_state_loss=part).loss_parts)
    else:
        out = label_smoothed_cross_entropy(model(**inputs).logits, batch["target"], **loss_args)
    return out.loss / max(out.ntokens, 1)


def count_flops(args: argparse.Namespace, size: str, device: torch.device) -> dict[str, Any]:
    """FlopCounterMode over one forward + backward of the plain model (no DeepSpeed), and the formula's count."""
    from biomedgpt.model import BiomedGPTForConditionalGeneration

    config = model_config(args, size, "reference")
    image = (args.image_size, args.image_size) if args.image_size else None
    formula = training_flops(
        forward_flops(config, args.batch, args.text_len, args.target_len, image, kept_patches(args) or None)
    )
    result: dict[str, Any] = {"formula_flops_per_step": formula, "counted_flops_per_step": None}
    if args.no_flop_count:
        return result
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(SEED)
    model = BiomedGPTForConditionalGeneration(config).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.train()
    batch = synthetic_batch(args, device)
    if device.type == "cuda" and "patch_images" in batch:
        batch["patch_images"] = batch["patch_images"].to(torch.bfloat16)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(model, batch, "plain").backward()
    result["counted_flops_per_step"] = int(counter.get_total_flops())
    result["counted_over_formula"] = result["counted_flops_per_step"] / formula
    del model, batch, counter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def ds_config(args: argparse.Namespace, stage: int, device: torch.device) -> dict[str, Any]:
    """Like biomedgpt/train/ds_configs/zero{2,3}_bf16.json and zero3_cpu.json, for one rank."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": device.type == "cuda", "contiguous_gradients": True,
                            "reduce_bucket_size": 50_000_000}  # fmt: skip
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=50_000_000, stage3_param_persistence_threshold=100_000)
    return {
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": device.type == "cuda"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as the trainer uses without FusedAdam
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def build_engine(args: argparse.Namespace, variant: Variant, device: torch.device) -> tuple[Any, dict[str, Any]]:
    import copy

    import deepspeed

    from biomedgpt.model import BiomedGPTForConditionalGeneration
    from biomedgpt.train.activation_checkpointing import apply_activation_checkpointing

    config = ds_config(args, variant.zero, device)
    model_cfg = model_config(args, variant.size, variant.attention)
    torch.manual_seed(SEED)
    if variant.zero == 3:  # no rank ever holds the whole model, as biomedgpt/train/recipes/biomedgpt.py builds it
        with deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(config)):
            model = BiomedGPTForConditionalGeneration(model_cfg)
    else:
        model = BiomedGPTForConditionalGeneration(model_cfg)
    apply_activation_checkpointing(model, variant.ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused=True: one kernel per step on CUDA (torch's own, no DeepSpeed op to compile)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(config))
    return engine, config


def train_step(engine: Any, batch: dict[str, torch.Tensor], loss_kind: str, step: int) -> float:
    torch.manual_seed(SEED + step)  # dropout draws depend on the step only, so a resumed run repeats them
    loss = loss_of(engine, batch, loss_kind)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    from biomedgpt.train.metrics import device_peak_tflops

    if device.type != "cuda":
        return args.peak_tflops
    return device_peak_tflops("bf16", args.peak_tflops)


# ---------------------------------------------------------------------------------------------------- one variant


def run_variant(
    args: argparse.Namespace, variant: Variant, flops: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    row: dict[str, Any] = {"name": variant.name, **asdict(variant), "ok": False}
    rss_before = max_rss_bytes()
    engine = None
    try:
        if variant.attention == "triton":
            from biomedgpt.kernels.attention import interpreting, require_triton

            require_triton()
            if device.type != "cuda" and not interpreting():
                raise RuntimeError("triton kernels on CPU need TRITON_INTERPRET=1 from process start")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        engine, _ = build_engine(args, variant, device)
        batch = synthetic_batch(args, device)
        if device.type == "cuda" and "patch_images" in batch:
            batch["patch_images"] = batch["patch_images"].to(torch.bfloat16)
        step = 0
        if args.resume:
            load_path, client = engine.load_checkpoint(str(args.resume))
            if load_path is None:
                raise RuntimeError(f"{args.resume}: no DeepSpeed checkpoint to resume from (no 'latest' file?)")
            step = int(client["step"])
            row["resumed_from_step"] = step
            if args.consolidate:
                row["consolidation"] = consolidate_and_compare(args, engine, variant)
        losses: list[float] = []
        for _ in range(args.warmup):
            losses.append(train_step(engine, batch, variant.loss, step))
            step += 1
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            losses.append(train_step(engine, batch, variant.loss, step))
            step += 1
        synchronize(device)
        seconds = time.perf_counter() - start
        row["losses"] = losses
        row["steps_done"] = step
        row.update(throughput(args, flops, seconds, peak_tflops(args, device)))
        if device.type == "cuda":
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
            row["memory_kind"] = "torch.cuda.max_memory_allocated"
        else:
            row["rss_high_water_bytes"] = max_rss_bytes()
            row["rss_growth_bytes"] = max_rss_bytes() - rss_before
            # The high-water mark cannot show what a switch saves (it never goes down); one more step, profiled,
            # gives the allocator's peak during a step above what was held before it (activations, gradients and
            # temporaries): what activation checkpointing and the fused loss reduce.
            profiled_step = functools.partial(train_step, engine, batch, variant.loss, step)
            loss, row["peak_memory_bytes"] = peak_allocated_bytes(profiled_step)
            losses.append(loss)
            step += 1
            row["steps_done"] = step
            row["memory_kind"] = "torch allocator peak during one profiled step, above the memory held before it"
        if args.save_checkpoint:
            engine.save_checkpoint(str(args.save_checkpoint), tag=f"bench_{step:08d}", client_state={"step": step})
            engine.module.config.save_pretrained(args.save_checkpoint)  # what consolidation reads
            row["saved_at_step"] = step
            after = []
            for _ in range(args.after_save_steps):
                after.append(train_step(engine, batch, variant.loss, step))
                step += 1
            row["losses_after_save"] = after
        row["ok"] = True
    except Exception as error:  # noqa: BLE001 - recorded per variant, the run goes on
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc(limit=8)
        print(f"{variant.name}: FAILED: {row['error']}", file=sys.stderr, flush=True)
    finally:
        if engine is not None:
            engine.destroy()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def throughput(args: argparse.Namespace, flops: dict[str, Any], seconds: float, peak: float | None) -> dict[str, Any]:
    steps_per_s = args.steps / seconds
    used = flops["counted_flops_per_step"] or flops["formula_flops_per_step"]
    achieved = used * steps_per_s / 1e12
    return {
        "timed_seconds": seconds,
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * args.batch,
        "tokens_per_step": tokens_per_step(args),
        "tokens_per_s": steps_per_s * tokens_per_step(args),
        "flops_per_step": used,
        "flops_source": "FlopCounterMode" if flops["counted_flops_per_step"] else "formula",
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": None if peak is None else achieved / peak,
    }


def consolidate_and_compare(args: argparse.Namespace, engine: Any, variant: Variant) -> dict[str, Any]:
    """Consolidate the checkpoint just loaded and compare its weights with the engine's gathered weights."""
    import deepspeed

    from biomedgpt.checkpoint.consolidate import consolidate_checkpoint
    from biomedgpt.model import BiomedGPTForConditionalGeneration
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    tokenizer = BiomedGPTTokenizer.default()
    result = consolidate_checkpoint(args.resume, args.consolidate, tokenizer=tokenizer, overwrite=True, progress=False)
    loaded = BiomedGPTForConditionalGeneration.from_pretrained(args.consolidate)
    written = loaded.state_dict()
    mismatched, compared, max_diff = [], 0, 0.0
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=variant.zero == 3):
            mine = param.detach().float().cpu()
        theirs = written[name].to(param.dtype).float()  # at the engine's precision (bf16 weights on GPU)
        compared += 1
        diff = float((mine - theirs).abs().max()) if mine.numel() else 0.0
        max_diff = max(max_diff, diff)
        if diff != 0.0:
            mismatched.append(name)
    return {
        "output_dir": str(args.consolidate),
        "num_parameters": result.num_parameters,
        "zero_stage": result.zero_stage,
        "compared_tensors": compared,
        "mismatched_tensors": mismatched[:10],
        "max_abs_diff": max_diff,
        "equal": not mismatched,
    }


# ---------------------------------------------------------------------------------------------------- report


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("transformers", "deepspeed", "triton"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so
            out[module] = None
    out["cuda"] = torch.version.cuda
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def markdown(results: dict[str, Any]) -> str:
    head = (
        "| variant | ok | steps/s | samples/s | tokens/s | TFLOP/s | MFU | peak memory (GiB) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in results["variants"]:
        if not row["ok"]:
            lines.append(f"| {row['name']} | **failed**: {row['error'][:120]} | | | | | | |")
            continue
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(
            f"| {row['name']} | yes | {row['steps_per_s']:.3f} | {row['samples_per_s']:.2f} "
            f"| {row['tokens_per_s']:.0f} | {row['achieved_tflops']:.4g} | {mfu} "
            f"| {row['peak_memory_bytes'] / 2**30:.2f} |"
        )
    flops = "\n".join(
        f"- {size}: FlopCounterMode "
        + (
            f"{f['counted_flops_per_step']:.4g}"
            if f["counted_flops_per_step"]
            else f"not counted ({f.get('count_error', 'off')})"
        )
        + f" FLOP/step, formula {f['formula_flops_per_step']:.4g}"
        + (f" (counted/formula {f['counted_over_formula']:.3f})" if "counted_over_formula" in f else "")
        for size, f in results["flops"].items()
    )
    s = results["setup"]
    return (
        f"`{s['command']}`\n\nMachine: {s['machine']}; " + ", ".join(f"{k} {v}" for k, v in s["versions"].items())
        + f"\n\n{head}" + "\n".join(lines) + f"\n\nFLOPs per training step:\n{flops}\n"
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed 0.19 calls collectives torch 2.14 deprecates, once per gather / reduction (as trainer.py filters).
    warnings.filterwarnings(
        "ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated", category=FutureWarning
    )
    device = torch.device(args.device)
    init_distributed(args.device)
    started = time.perf_counter()
    flops: dict[str, dict[str, Any]] = {}
    rows = []
    for size in args.sizes:
        try:
            flops[size] = count_flops(args, size, device)
        except Exception as error:  # noqa: BLE001 - fall back to the formula, say why
            config = model_config(args, size, "reference")
            image = (args.image_size, args.image_size) if args.image_size else None
            fwd = forward_flops(config, args.batch, args.text_len, args.target_len, image, kept_patches(args) or None)
            flops[size] = {"formula_flops_per_step": training_flops(fwd), "counted_flops_per_step": None,
                           "count_error": f"{type(error).__name__}: {error}"}  # fmt: skip
        for (attention, loss), zero, ckpt in itertools.product(args.pairs, args.zero, args.ckpt):
            variant = Variant(size, attention, loss, zero, ckpt)
            row = run_variant(args, variant, flops[size], device)
            rows.append(row)
            if row["ok"]:
                mfu = "" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"
                print(f"{variant.name}: {row['steps_per_s']:.3f} steps/s, {row['tokens_per_s']:.0f} tokens/s, "
                      f"{row['achieved_tflops']:.4g} TFLOP/s{mfu}", flush=True)  # fmt: skip
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    setting_keys = ("batch", "image_size", "patches", "text_len", "target_len", "vocab", "dropout", "steps", "warmup")
    results = {
        "setup": {
            "command": command,
            "machine": machine(device),
            "device": device.type,
            "precision": "bf16" if device.type == "cuda" else "fp32",
            "versions": versions(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "seconds": time.perf_counter() - started,
            **{k: getattr(args, k) for k in setting_keys},
        },
        "flops": flops,
        "variants": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results))
    print(markdown(results))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
