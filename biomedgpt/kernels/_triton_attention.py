# ruff: noqa: N803, E741 - Triton convention: pointer arguments in capitals, O is the output pointer
"""Triton forward and backward kernels of BiomedGPT's biased attention (loaded by ``biomedgpt.kernels.attention``).

One program owns a block of queries (forward) or of keys (backward) of one (batch, head). The additive bias of a
logit block is rebuilt in registers from what the model has anyway:
- the absolute-position bias rides in q.k: the caller appends the position projections to q and k as extra head
  dimensions (OFA models/ofa/unify_transformer.py computes it as a separate q_pos.k_pos product with the same scale);
- the 1-D text bias is ``text_table[text_index[i, j], h]``, the index a small [Tq, Tk] bucket matrix shared by the
  batch (OFA get_rel_pos_bias);
- the 2-D image bias is ``image_table[bucket(ids[b, i], ids[b, j]), h]``, the bucket computed here from the two
  patches' position ids (OFA make_image_bucket_position), so sampled patches need no per-sample index;
- key padding and causality become -inf.
Softmax is the online (streaming) form of FlashAttention (Dao et al. 2022, Algorithm 1); dropout is a Philox draw
(``tl.rand``) keyed by (batch, head, query, key) so the backward regenerates the same mask. The backward follows
FlashAttention-2's key-block loop; dq and the two table gradients are accumulated with atomics.

This module imports triton at the top: import it only through ``biomedgpt.kernels.attention``, which loads it once
per mode (compiled, or under ``TRITON_INTERPRET=1``: ``triton.jit`` picks the mode when it decorates).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _text_bucket(TEXT_INDEX, TEXT_ROWS, s_ti_m, s_ti_n, b, offs_m, offs_n, text_q0, text_k0, text_tq, text_tk):
    rows = offs_m - text_q0
    cols = offs_n - text_k0
    valid = ((rows >= 0) & (rows < text_tq))[:, None] & ((cols >= 0) & (cols < text_tk))[None, :]
    valid = valid & (tl.load(TEXT_ROWS + b) != 0)
    index = tl.load(TEXT_INDEX + rows[:, None] * s_ti_m + cols[None, :] * s_ti_n, mask=valid, other=0)
    return index, valid


@triton.jit
def _image_bucket(Q_IDS, K_IDS, IMAGE_ROWS, s_qi_b, s_ki_b, b, offs_m, offs_n, img_tq, img_tk, grid, num_buckets):
    # Same numbering as biomedgpt.model.positions.image_relative_buckets: ids are row*grid + col + 1, id 0 is
    # reserved and gets the last three buckets.
    q_ok = offs_m < img_tq
    k_ok = offs_n < img_tk
    q_id = tl.load(Q_IDS + b * s_qi_b + offs_m, mask=q_ok, other=0)
    k_id = tl.load(K_IDS + b * s_ki_b + offs_n, mask=k_ok, other=0)
    q_cell = tl.maximum(q_id - 1, 0)
    k_cell = tl.maximum(k_id - 1, 0)
    d_row = (q_cell // grid)[:, None] - (k_cell // grid)[None, :] + grid - 1
    d_col = (q_cell % grid)[:, None] - (k_cell % grid)[None, :] + grid - 1
    index = d_row * (2 * grid - 1) + d_col
    q_zero = (q_id == 0)[:, None]
    k_zero = (k_id == 0)[None, :]
    index = tl.where(k_zero, num_buckets - 2, index)
    index = tl.where(q_zero, num_buckets - 3, index)
    index = tl.where(q_zero & k_zero, num_buckets - 1, index)
    valid = q_ok[:, None] & k_ok[None, :] & (tl.load(IMAGE_ROWS + b) != 0)
    return index, valid


@triton.jit
def _scores(
    q, k, b, h, offs_m, offs_n, Tq, Tk,
    KPAD, s_kpad_b, causal_offset,
    TEXT_TABLE, TEXT_INDEX, TEXT_ROWS, s_tt, s_ti_m, s_ti_n, text_q0, text_k0, text_tq, text_tk,
    IMAGE_TABLE, Q_IDS, K_IDS, IMAGE_ROWS, s_it, s_qi_b, s_ki_b, img_tq, img_tk, grid, num_buckets,
    HAS_KPAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Biased, masked logits of one [BLOCK_M, BLOCK_N] block, with the bucket indices for the backward."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    text_index = tl.zeros(s.shape, tl.int32)
    text_ok = text_index != 0
    image_index = tl.zeros(s.shape, tl.int32)
    image_ok = image_index != 0
    if HAS_TEXT:
        text_index, text_ok = _text_bucket(
            TEXT_INDEX, TEXT_ROWS, s_ti_m, s_ti_n, b, offs_m, offs_n, text_q0, text_k0, text_tq, text_tk
        )
        s += tl.load(TEXT_TABLE + text_index * s_tt + h, mask=text_ok, other=0.0).to(tl.float32)
    if HAS_IMAGE:
        image_index, image_ok = _image_bucket(
            Q_IDS, K_IDS, IMAGE_ROWS, s_qi_b, s_ki_b, b, offs_m, offs_n, img_tq, img_tk, grid, num_buckets
        )
        s += tl.load(IMAGE_TABLE + image_index * s_it + h, mask=image_ok, other=0.0).to(tl.float32)
    keep = (offs_n < Tk)[None, :] & (offs_m >= 0)[:, None]
    if HAS_KPAD:
        padded = tl.load(KPAD + b * s_kpad_b + offs_n, mask=offs_n < Tk, other=1)
        keep = keep & (padded == 0)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= (offs_m + causal_offset)[:, None])
    s = tl.where(keep, s, float("-inf"))
    return s, text_index, text_ok, image_index, image_ok


@triton.jit
def _dropout_keep(seed, b, h, H, Tq, Tk, offs_m, offs_n, dropout_p):
    # One Philox stream per logit, keyed by its flat [B, H, Tq, Tk] index (int32: the caller checks the size).
    flat = ((b * H + h) * Tq + offs_m)[:, None] * Tk + offs_n[None, :]
    return tl.rand(seed, flat) >= dropout_p


@triton.jit
def attention_forward_kernel(
    Q, K, V, O, LSE,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    KPAD, s_kpad_b, causal_offset,
    TEXT_TABLE, TEXT_INDEX, TEXT_ROWS, s_tt, s_ti_m, s_ti_n, text_q0, text_k0, text_tq, text_tk,
    IMAGE_TABLE, Q_IDS, K_IDS, IMAGE_ROWS, s_it, s_qi_b, s_ki_b, img_tq, img_tk, grid, num_buckets,
    H, Tq, Tk, D, DV, seed, dropout_p,
    HAS_KPAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    q_ptrs = Q + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + h * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    end_n = Tk
    if CAUSAL:
        # Keys after the block's last query step are all masked: stop before them.
        end_n = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=n_ok[:, None] & (offs_d < D)[None, :],
                    other=0.0)  # fmt: skip
        s, _, _, _, _ = _scores(
            q, k, b, h, offs_m, offs_n, Tq, Tk,
            KPAD, s_kpad_b, causal_offset,
            TEXT_TABLE, TEXT_INDEX, TEXT_ROWS, s_tt, s_ti_m, s_ti_n, text_q0, text_k0, text_tq, text_tk,
            IMAGE_TABLE, Q_IDS, K_IDS, IMAGE_ROWS, s_it, s_qi_b, s_ki_b, img_tq, img_tk, grid, num_buckets,
            HAS_KPAD, CAUSAL, HAS_TEXT, HAS_IMAGE, PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all masked (e.g. the patches of a sample without an image) has max -inf:
        # shift by 0 instead so exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, b, h, H, Tq, Tk, offs_m, offs_n, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :], mask=n_ok[:, None] & (offs_dv < DV)[None, :],
                    other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # A fully masked row gives 0/0 = NaN, as the reference softmax over all -inf does.
    out = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def attention_backward_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV_OUT,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_dom,
    KPAD, s_kpad_b, causal_offset,
    TEXT_TABLE, TEXT_INDEX, TEXT_ROWS, s_tt, s_ti_m, s_ti_n, text_q0, text_k0, text_tq, text_tk,
    IMAGE_TABLE, Q_IDS, K_IDS, IMAGE_ROWS, s_it, s_qi_b, s_ki_b, img_tq, img_tk, grid, num_buckets,
    D_TEXT_TABLE, D_IMAGE_TABLE,
    H, Tq, Tk, D, DV, seed, dropout_p,
    HAS_KPAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dq (fp32, atomics), dk, dv and the table gradients; DQ/DK/DV_OUT are contiguous [B, H, T, D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Tk
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    k = tl.load(K + b.to(tl.int64) * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    v = tl.load(V + b.to(tl.int64) * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
    q_base = Q + b.to(tl.int64) * s_qb + h * s_qh
    do_base = DO + b.to(tl.int64) * s_dob + h * s_doh
    dq_base = DQ + pid_bh.to(tl.int64) * Tq * D
    row_base = pid_bh.to(tl.int64) * Tq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    start = 0
    if CAUSAL:
        # Queries whose step is before this key block's first key see none of it.
        start = (tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(start, Tq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_dom + offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :],
                     other=0.0)  # fmt: skip
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s, text_index, text_ok, image_index, image_ok = _scores(
            q, k, b, h, offs_m, offs_n, Tq, Tk,
            KPAD, s_kpad_b, causal_offset,
            TEXT_TABLE, TEXT_INDEX, TEXT_ROWS, s_tt, s_ti_m, s_ti_n, text_q0, text_k0, text_tq, text_tk,
            IMAGE_TABLE, Q_IDS, K_IDS, IMAGE_ROWS, s_it, s_qi_b, s_ki_b, img_tq, img_tk, grid, num_buckets,
            HAS_KPAD, CAUSAL, HAS_TEXT, HAS_IMAGE, PRECISION,
        )  # fmt: skip
        p = tl.where(m_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, b, h, H, Tq, Tk, offs_m, offs_n, dropout_p)
            p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_dropped = p
        dv += tl.dot(tl.trans(p_dropped).to(do.dtype), do, input_precision=PRECISION)
        # Softmax backward: dS = P * (dP - rowsum(dO * O)); delta is that row sum, from the caller.
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.atomic_add(dq_base + offs_m[:, None] * D + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :])
        # The bias enters the logits unscaled, so its gradient is dS, summed per (bucket, head).
        block_ok = m_ok[:, None] & n_ok[None, :]
        if HAS_TEXT:
            tl.atomic_add(D_TEXT_TABLE + text_index * s_tt + h, ds, mask=text_ok & block_ok)
        if HAS_IMAGE:
            tl.atomic_add(D_IMAGE_TABLE + image_index * s_it + h, ds, mask=image_ok & block_ok)
    dk_base = DK + pid_bh.to(tl.int64) * Tk * D
    tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])  # fmt: skip
    dv_base = DV_OUT + pid_bh.to(tl.int64) * Tk * DV
    tl.store(dv_base + offs_n[:, None] * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=n_ok[:, None] & dv_ok[None, :])  # fmt: skip


@triton.jit
def dropout_keep_kernel(OUT, H, Tq, Tk, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask the attention kernels draw, written out [B, H, Tq, Tk] (tests only)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, b, h, H, Tq, Tk, offs_m, offs_n, dropout_p)
    ok = (offs_m < Tq)[:, None] & (offs_n < Tk)[None, :]
    ptrs = OUT + pid_bh.to(tl.int64) * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=ok)
