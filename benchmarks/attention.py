"""Fused attention (the ``triton`` backend) against SDPA with the materialised bias and the ``reference`` attention:
time of forward + backward, and (``--check``) agreement with an fp32 reference.

The case is an encoder self-attention as pretraining has it: ``--length`` positions of which the first
``--patches`` are sampled image patches (each example its own), the rest text, with the absolute-position bias
(q_pos . k_pos), the 2-D image and 1-D text relative-position biases from the model's bucket tables
(biomedgpt.model.positions) and right padding. ``sdpa`` and ``reference`` get the dense [B, H, T, T] bias built
from those parts (what the model's sdpa path does); ``triton`` gets the parts (biomedgpt.kernels.AttentionBias).
Gradients flow to q, k, v and all the bias parts in every variant.

``--check``: the same case (and a causal decoder case) in ``--dtype`` against the reference in fp32 with the dense
bias; the errors relative to the fp32 reference's norm must stay under ``--tolerance`` (default 2e-2 for bf16,
1e-4 for fp32). Exit status 1 when a check fails, or (benchmark mode, on CUDA) when fused is not ``--target``
times faster than sdpa.

GPU: ``python benchmarks/attention.py --length 1024 --dtype bf16 --json out.json`` (and ``--check``).
CPU: only under ``TRITON_INTERPRET=1`` and at small sizes, to prove the script (interpreted kernels are slow).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from biomedgpt.kernels import AttentionBias, ImageRelativeBias, TextRelativeBias, fused_attention
from biomedgpt.model.attention import reference_attention
from biomedgpt.model.positions import image_relative_bucket_count, image_relative_buckets, text_relative_buckets

GRID = 42  # image_bucket_size of every BiomedGPT size
TOKEN_BUCKETS = 256
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_case(args: argparse.Namespace, device: torch.device, causal: bool = False) -> dict[str, Any]:
    """fp32 leaves (q, k, v and the bias parts) of one attention call; see the module docstring."""
    gen = torch.Generator().manual_seed(0)
    b, h, t, d = args.batch, args.heads, args.length, args.head_dim
    patches = 0 if causal else min(args.patches, t - 1)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_(True)

    leaves = {name: leaf(b, h, t, d) for name in ("q", "k", "v")}
    leaves["q_pos"] = leaf(b, h, t, d, scale=d**-0.5)
    leaves["k_pos"] = leaf(b, h, t, d)
    leaves["text_table"] = leaf(2 * TOKEN_BUCKETS - 1, h, scale=0.1)
    padding = torch.zeros(b, t, dtype=torch.bool)
    padding[-1, t - t // 8 :] = True  # the last example is shorter
    case: dict[str, Any] = {"leaves": leaves, "padding": padding.to(device), "patches": patches, "causal": causal}
    case["text_index"] = text_relative_buckets(TOKEN_BUCKETS, 1024)[: t - patches, : t - patches].to(device)
    if patches:
        leaves["image_table"] = leaf(image_relative_bucket_count(GRID), h, scale=0.1)
        side = 24  # a 384 px image's 24 x 24 patch grid
        cells = torch.stack([torch.randperm(side * side, generator=gen)[:patches].sort().values for _ in range(b)])
        case["image_ids"] = ((cells // side) * GRID + cells % side + 1).to(device)
    return case


def parts(case: dict[str, Any], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], AttentionBias]:
    """The leaves cast to ``dtype`` (differentiable casts) and the AttentionBias made of them."""
    x = {name: tensor.to(dtype) for name, tensor in case["leaves"].items()}
    p = case["patches"]
    image = None
    if p:
        image = ImageRelativeBias(x["image_table"], case["image_ids"], case["image_ids"], GRID)
    bias = AttentionBias(
        q_pos=x["q_pos"],
        k_pos=x["k_pos"],
        key_padding=case["padding"],
        causal_offset=0 if case["causal"] else None,
        text=TextRelativeBias(x["text_table"], case["text_index"], q_start=p, k_start=p),
        image=image,
    )
    return x, bias


def dense_bias(case: dict[str, Any], x: dict[str, torch.Tensor], bias: AttentionBias) -> torch.Tensor:
    """The [B, H, T, T] bias the model's dense path adds, built from the same parts by gathering the tables."""
    b, h, t, _ = x["q"].shape
    p = case["patches"]
    dense = bias.q_pos @ bias.k_pos.transpose(-1, -2)
    text = x["text_table"][case["text_index"]].permute(2, 0, 1)[None]  # [1, H, T-p, T-p]
    dense = dense + F.pad(text, (p, 0, p, 0))
    if p:
        ids = case["image_ids"]
        buckets = image_relative_buckets(GRID).to(ids.device)[ids[:, :, None], ids[:, None, :]]
        image = x["image_table"][buckets].permute(0, 3, 1, 2)  # [B, H, p, p]
        dense = dense + F.pad(image, (0, t - p, 0, t - p))
    masked = case["padding"][:, None, None, :].expand(b, 1, t, t)
    if case["causal"]:
        masked = masked | torch.ones(t, t, dtype=torch.bool, device=masked.device).triu(1)
    return dense.masked_fill(masked, float("-inf"))


def forward(variant: str, case: dict[str, Any], dtype: torch.dtype, scale: float) -> torch.Tensor:
    x, bias = parts(case, dtype)
    if variant == "triton":
        return fused_attention(x["q"], x["k"], x["v"], bias, scale)
    dense = dense_bias(case, x, bias)
    if variant == "sdpa":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=dense.to(dtype), scale=scale)
    return reference_attention(x["q"], x["k"], x["v"], dense, scale, 0.0)


def fwd_bwd(variant: str, case: dict[str, Any], dtype: torch.dtype, scale: float, grad: torch.Tensor) -> Any:
    for leaf in case["leaves"].values():
        leaf.grad = None
    out = forward(variant, case, dtype, scale)
    out.backward(grad.to(out.dtype))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(variant: str, case: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict:
    dtype, scale = DTYPES[args.dtype], (args.head_dim * 2.0) ** -0.5
    grad = torch.randn(case["leaves"]["q"].shape, generator=torch.Generator().manual_seed(1)).to(device)
    row: dict[str, Any] = {"variant": variant, "ok": False}
    try:
        for _ in range(args.warmup):
            fwd_bwd(variant, case, dtype, scale, grad)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            sync(device)
            tick = time.perf_counter()
            fwd_bwd(variant, case, dtype, scale, grad)
            sync(device)
            times.append(time.perf_counter() - tick)
        row.update(ok=True, seconds=times, median_ms=1e3 * statistics.median(times))
        if device.type == "cuda":
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    except Exception as error:  # noqa: BLE001 - recorded; the other variants still run
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


def check(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """fused and sdpa in ``--dtype`` against the reference in fp32: output and every gradient."""
    dtype, scale = DTYPES[args.dtype], (args.head_dim * 2.0) ** -0.5
    tolerance = args.tolerance or (1e-4 if dtype == torch.float32 else 2e-2)
    rows = []
    for causal in (False, True):
        case = make_case(args, device, causal)
        grad = torch.randn(case["leaves"]["q"].shape, generator=torch.Generator().manual_seed(1)).to(device)
        out = fwd_bwd("reference", case, torch.float32, scale, grad).detach()
        expected = {"out": out, **{f"grad_{k}": v.grad.clone() for k, v in case["leaves"].items()}}
        for variant in ("triton", "sdpa"):
            row: dict[str, Any] = {"case": "decoder causal" if causal else "encoder", "variant": variant}
            try:
                got = fwd_bwd(variant, case, dtype, scale, grad).detach()
                errors = {"out": relative_error(got, out)}
                errors.update({f"grad_{k}": relative_error(v.grad, expected[f"grad_{k}"]) for k, v in
                               case["leaves"].items()})  # fmt: skip
                row.update(errors=errors, max_error=max(errors.values()), tolerance=tolerance)
                row["ok"] = all(math.isfinite(e) and e <= tolerance for e in errors.values())
            except Exception as error:  # noqa: BLE001
                row.update(ok=False, error=f"{type(error).__name__}: {error}")
            rows.append(row)
            print(f"check {row['case']} {variant} {args.dtype}: " + ("ok" if row["ok"] else "FAILED") +
                  (f", max relative error {row['max_error']:.2e} (tolerance {tolerance:g})" if "max_error" in row
                   else f": {row.get('error')}"), flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024, help="positions T (default 1,024)")
    p.add_argument("--patches", type=int, default=576, help="leading image patches (default 576: 384 px, all kept)")
    p.add_argument("--batch", type=int, default=4, help="examples B (default 4)")
    p.add_argument("--heads", type=int, default=16, help="heads H (default 16, large/xlarge)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--variants", default="triton,sdpa,reference", help="comma-separated (default all three)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--target", type=float, default=3.0, help="required sdpa / triton time ratio on CUDA (3)")
    p.add_argument("--check", action="store_true", help="check agreement with the fp32 reference instead")
    p.add_argument("--tolerance", type=float, help="--check: largest relative error allowed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and "triton" in args.variants:
        print("note: on CPU the triton variant needs TRITON_INTERPRET=1 from process start; it will fail", flush=True)
    result: dict[str, Any] = {
        "setup": {**{k: v for k, v in vars(args).items() if k != "json"}, "device": str(device),
                  "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"{os.cpu_count()}-core {platform.machine()} CPU",
                  "torch": torch.__version__, "python": platform.python_version(),
                  "command": " ".join(["attention.py", *(argv if argv is not None else sys.argv[1:])])},
    }  # fmt: skip
    if args.check:
        rows = check(args, device)
        result["checks"] = rows
        status = 0 if all(r["ok"] for r in rows) else 1
    else:
        case = make_case(args, device)
        rows = [time_variant(v, case, args, device) for v in args.variants.split(",")]
        result["variants"] = rows
        for row in rows:
            print(f"{row['variant']}: " + (f"{row['median_ms']:.2f} ms fwd+bwd" if row["ok"] else row["error"]))
        times = {r["variant"]: r["median_ms"] for r in rows if r["ok"]}
        status = 0 if all(r["ok"] for r in rows) else 1
        if "triton" in times and "sdpa" in times:
            result["sdpa_over_triton"] = times["sdpa"] / times["triton"]
            met = result["sdpa_over_triton"] >= args.target
            result["target_met"] = met if device.type == "cuda" else None  # CPU: interpreter, no claim
            print(f"sdpa / triton = {result['sdpa_over_triton']:.2f}x (target {args.target}x on CUDA)")
            if device.type == "cuda" and not met:
                status = 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
