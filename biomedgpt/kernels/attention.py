"""Fused attention with BiomedGPT's position biases: the ``triton`` attention backend.

``fused_attention`` computes what ``biomedgpt.model.attention.reference_attention`` computes with the dense bias
the model would build, without ever holding a [B, H, Tq, Tk] tensor: the absolute-position bias is folded into the
head dimension (q' = [s*q ; q_pos], k' = [k ; k_pos], so q'.k' = s*q.k + q_pos.k_pos), the relative biases are
looked up from the bucket tables inside the kernel, masks are applied there, the softmax is online and dropout is
drawn in the kernel. Gradients reach q, k, v, the position projections (through the concatenation) and the tables.

Triton is optional: this module imports without it, and ``fused_attention`` then raises a RuntimeError saying
what to install or which backend to choose. CPU tensors run under Triton's interpreter and only when
``TRITON_INTERPRET=1`` is set (it is slow: tests only); it is exact in fp32 and fp16, wrong in bf16 without an
error, so bf16 is for GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from biomedgpt.kernels.bias import AttentionBias

_KERNEL_FILE = Path(__file__).with_name("_triton_attention.py")


def triton_available() -> bool:
    """Whether the triton package imports (a GPU, or TRITON_INTERPRET=1 on CPU, is needed to run it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton() -> None:
    """Raise a RuntimeError naming the fix when the ``triton`` backend cannot run on this machine."""
    if not triton_available():
        raise RuntimeError(
            "attention_backend='triton' needs the triton package (pip install triton; it ships with CUDA builds of "
            "torch); set attention_backend to 'sdpa' or 'reference' on this machine"
        )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels(interpret: bool) -> ModuleType:
    """The kernel module, loaded once per mode: ``triton.jit`` reads TRITON_INTERPRET when it decorates, so the
    interpreted and compiled kernels are two loads of one file under two names."""
    require_triton()
    name = "biomedgpt.kernels._triton_attention" + ("_interpreted" if interpret else "_compiled")
    spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton's interpreter looks functions up through their module
    spec.loader.exec_module(module)
    return module


def _kernel_module(device: torch.device) -> ModuleType:
    interpret = interpreting()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"attention_backend='triton' got {device.type} tensors: its kernels run on CUDA GPUs, or on the CPU "
            "under Triton's interpreter when TRITON_INTERPRET=1 is set (slow, for tests); choose 'sdpa' otherwise"
        )
    return _kernels(interpret)


def _block_sizes(device: torch.device, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    # 16 under the interpreter keeps tests small while still crossing block edges; 64 on a GPU is the usual
    # FlashAttention tile, not tuned here (no GPU measurement yet).
    default = 16 if interpreting() or device.type != "cuda" else 64
    return block_m or default, block_n or default


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Launch:
    """The non-differentiable inputs of one call and the kernel arguments they become."""

    def __init__(self, bias: AttentionBias, batch: int, heads: int, tq: int, tk: int, device: torch.device) -> None:
        self.dummy_int = torch.zeros(1, dtype=torch.int32, device=device)
        self.dummy_float = torch.zeros(1, dtype=torch.float32, device=device)
        ones = torch.ones(batch, dtype=torch.int8, device=device)

        def sample_rows(rows: torch.Tensor | None, what: str) -> torch.Tensor:
            if rows is None:
                return ones
            if rows.shape != (batch,):
                raise ValueError(f"AttentionBias.{what}.rows has shape {tuple(rows.shape)}, expected ({batch},)")
            return rows.to(device=device, dtype=torch.int8).contiguous()

        self.key_padding = None
        if bias.key_padding is not None:
            if bias.key_padding.shape != (batch, tk):
                raise ValueError(
                    f"AttentionBias.key_padding has shape {tuple(bias.key_padding.shape)}, expected ({batch}, {tk})"
                )
            self.key_padding = bias.key_padding.to(device=device, dtype=torch.int8).contiguous()
        self.causal_offset = bias.causal_offset

        self.text_index, self.text_rows = None, ones
        self.text_q0 = self.text_k0 = self.text_tq = self.text_tk = 0
        if bias.text is not None:
            text = bias.text
            index = text.index
            if index.dim() != 2 or text.q_start + index.shape[0] > tq or text.k_start + index.shape[1] > tk:
                raise ValueError(
                    f"AttentionBias.text.index has shape {tuple(index.shape)} at ({text.q_start}, {text.k_start}), "
                    f"outside the [{tq}, {tk}] logits"
                )
            if text.table.dim() != 2 or text.table.shape[1] != heads:
                raise ValueError(f"AttentionBias.text.table has shape {tuple(text.table.shape)}, expected [R, {heads}]")
            self.text_index = index.to(device=device, dtype=torch.int32).contiguous()
            self.text_rows = sample_rows(text.rows, "text")
            self.text_q0, self.text_k0 = text.q_start, text.k_start
            self.text_tq, self.text_tk = index.shape

        self.q_ids = self.k_ids = None
        self.image_rows, self.grid, self.img_tq, self.img_tk = ones, 1, 0, 0
        if bias.image is not None:
            image = bias.image
            if image.q_ids.dim() != 2 or image.q_ids.shape[0] != batch or image.q_ids.shape[1] > tq:
                raise ValueError(
                    f"AttentionBias.image.q_ids has shape {tuple(image.q_ids.shape)}; expected [{batch}, <={tq}]"
                )
            if image.k_ids.dim() != 2 or image.k_ids.shape[0] != batch or image.k_ids.shape[1] > tk:
                raise ValueError(
                    f"AttentionBias.image.k_ids has shape {tuple(image.k_ids.shape)}; expected [{batch}, <={tk}]"
                )
            expected_rows = (2 * image.grid_size - 1) ** 2 + 3
            if image.table.shape != (expected_rows, heads):
                raise ValueError(
                    f"AttentionBias.image.table has shape {tuple(image.table.shape)}, expected ({expected_rows}, "
                    f"{heads}) for grid_size={image.grid_size}"
                )
            self.q_ids = image.q_ids.to(device=device, dtype=torch.int32).contiguous()
            self.k_ids = image.k_ids.to(device=device, dtype=torch.int32).contiguous()
            self.image_rows = sample_rows(image.rows, "image")
            self.grid = image.grid_size
            self.img_tq, self.img_tk = image.q_ids.shape[1], image.k_ids.shape[1]

    def bias_args(self, text_table: torch.Tensor | None, image_table: torch.Tensor | None) -> list[Any]:
        """Kernel arguments from KPAD to num_buckets, in the kernels' order."""
        kpad = self.key_padding if self.key_padding is not None else self.dummy_int
        text_table = text_table if text_table is not None else self.dummy_float
        text_index = self.text_index if self.text_index is not None else self.dummy_int
        image_table = image_table if image_table is not None else self.dummy_float
        q_ids = self.q_ids if self.q_ids is not None else self.dummy_int
        k_ids = self.k_ids if self.k_ids is not None else self.dummy_int
        return [
            kpad, kpad.stride(0) if self.key_padding is not None else 0, self.causal_offset or 0,
            text_table, text_index, self.text_rows,
            text_table.stride(0) if text_table.dim() == 2 else 0,
            text_index.stride(0) if text_index.dim() == 2 else 0,
            text_index.stride(1) if text_index.dim() == 2 else 0,
            self.text_q0, self.text_k0, self.text_tq, self.text_tk,
            image_table, q_ids, k_ids, self.image_rows,
            image_table.stride(0) if image_table.dim() == 2 else 0,
            q_ids.stride(0) if q_ids.dim() == 2 else 0,
            k_ids.stride(0) if k_ids.dim() == 2 else 0,
            self.img_tq, self.img_tk, self.grid, (2 * self.grid - 1) ** 2 + 3,
        ]  # fmt: skip

    def flags(self) -> dict[str, bool]:
        return dict(
            HAS_KPAD=self.key_padding is not None,
            CAUSAL=self.causal_offset is not None,
            HAS_TEXT=self.text_index is not None,
            HAS_IMAGE=self.q_ids is not None,
        )


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_table: torch.Tensor | None,
        image_table: torch.Tensor | None,
        launch: _Launch,
        dropout_p: float,
        seed: int,
        blocks: tuple[int, int],
    ) -> torch.Tensor:
        kernels = _kernel_module(q.device)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, tq, dim = q.shape
        tk, dim_v = k.shape[2], v.shape[3]
        text_table = None if text_table is None else text_table.contiguous()
        image_table = None if image_table is None else image_table.contiguous()
        out = torch.empty(batch, heads, tq, dim_v, dtype=v.dtype, device=v.device)
        lse = torch.empty(batch, heads, tq, dtype=torch.float32, device=q.device)
        block_m, block_n = blocks
        grid = (triton_cdiv(tq, block_m), batch * heads)
        kernels.attention_forward_kernel[grid](
            q, k, v, out, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *launch.bias_args(text_table, image_table),
            heads, tq, tk, dim, dim_v, seed, dropout_p,
            **launch.flags(), HAS_DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_next_power_of_2(max(dim, 16)),
            BLOCK_DV=_next_power_of_2(max(dim_v, 16)),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, text_table, image_table)
        ctx.launch, ctx.dropout_p, ctx.seed, ctx.blocks = launch, dropout_p, seed, blocks
        ctx.has_text, ctx.has_image = text_table is not None, image_table is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse, text_table, image_table = ctx.saved_tensors
        launch: _Launch = ctx.launch
        kernels = _kernel_module(q.device)
        batch, heads, tq, dim = q.shape
        tk, dim_v = k.shape[2], v.shape[3]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()
        dq = torch.zeros(batch, heads, tq, dim, dtype=torch.float32, device=q.device)
        dk = torch.empty(batch, heads, tk, dim, dtype=k.dtype, device=k.device)
        dv = torch.empty(batch, heads, tk, dim_v, dtype=v.dtype, device=v.device)
        d_text = torch.zeros(text_table.shape, dtype=torch.float32, device=q.device) if ctx.has_text else None
        d_image = torch.zeros(image_table.shape, dtype=torch.float32, device=q.device) if ctx.has_image else None
        block_m, block_n = ctx.blocks
        grid = (triton_cdiv(tk, block_n), batch * heads)
        kernels.attention_backward_kernel[grid](
            q, k, v, grad_out, lse, delta, dq, dk, dv,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
            *launch.bias_args(text_table, image_table),
            d_text if d_text is not None else launch.dummy_float,
            d_image if d_image is not None else launch.dummy_float,
            heads, tq, tk, dim, dim_v, ctx.seed, ctx.dropout_p,
            **launch.flags(), HAS_DROPOUT=ctx.dropout_p > 0, PRECISION=_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_next_power_of_2(max(dim, 16)),
            BLOCK_DV=_next_power_of_2(max(dim_v, 16)),
        )  # fmt: skip
        return (
            dq.to(q.dtype),
            dk,
            dv,
            None if d_text is None else d_text.to(text_table.dtype),
            None if d_image is None else d_image.to(image_table.dtype),
            None,
            None,
            None,
            None,
        )


def triton_cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: exact fp32 products (Triton's default on GPUs is TF32, which would break the 1e-4 match).
    return "ieee" if dtype == torch.float32 else None


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AttentionBias,
    scale: float,
    dropout_p: float = 0.0,
    block_m: int | None = None,
    block_n: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """[B,H,Tq,hd] x [B,H,Tk,hd] -> [B,H,Tq,hd]: softmax(scale*q.k + bias) @ v with dropout ``dropout_p`` on the
    probabilities, ``bias`` given by its parts (see ``AttentionBias``). The dropout mask comes from ``seed``, by
    default drawn from torch's default CPU generator, so ``torch.manual_seed`` makes it repeatable (and activation
    checkpointing, which restores that generator, redraws the same mask)."""
    require_triton()
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    batch, heads, tq, _ = query.shape
    tk = key.shape[2]
    q = query * scale
    k = key
    if (bias.q_pos is None) != (bias.k_pos is None):
        raise ValueError("AttentionBias needs both q_pos and k_pos, or neither")
    if bias.q_pos is not None and bias.k_pos is not None:
        q = torch.cat([q, bias.q_pos.to(q.dtype).expand(batch, heads, tq, -1)], dim=-1)
        k = torch.cat([k, bias.k_pos.to(k.dtype).expand(batch, heads, tk, -1)], dim=-1)
    if dropout_p > 0:
        if batch * heads * tq * tk >= 2**31:
            raise ValueError(
                f"in-kernel dropout numbers logits with int32: B*H*Tq*Tk = {batch * heads * tq * tk} is too many; "
                "use a smaller batch per step or attention_dropout=0"
            )
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())
    seed = seed or 0
    launch = _Launch(bias, batch, heads, tq, tk, query.device)
    text_table = None if bias.text is None else bias.text.table
    image_table = None if bias.image is None else bias.image.table
    blocks = _block_sizes(query.device, block_m, block_n)
    return _FusedAttention.apply(q, k, value, text_table, image_table, launch, dropout_p, seed, blocks)


def dropout_keep_mask(
    batch: int, heads: int, tq: int, tk: int, seed: int, dropout_p: float, device: torch.device
) -> torch.Tensor:
    """The [B, H, Tq, Tk] bool keep mask the kernels draw for ``seed`` (to test the dropout against a reference)."""
    kernels = _kernel_module(device)
    out = torch.empty(batch, heads, tq, tk, dtype=torch.int8, device=device)
    grid = (triton_cdiv(tq, 16), triton_cdiv(tk, 16), batch * heads)
    kernels.dropout_keep_kernel[grid](out, heads, tq, tk, seed, dropout_p, BLOCK_M=16, BLOCK_N=16)
    return out.bool()
