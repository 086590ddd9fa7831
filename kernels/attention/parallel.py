"""Full attention in Triton (flash-attention 2 scheme): forward, backward, autograd and the public function.

Layout: q [B, T, HQ, Dk], k [B, S, H, Dk], v [B, S, H, Dv] with the head dim contiguous; query head hq
uses KV head hq // (HQ // H). Scores run in base 2 (exp2) with the scale folded into one factor.
Every program walks its key (or query) range in three parts: a masked head (window edge), an unmasked
middle, and a masked tail (causal diagonal, ragged end), so the mask costs only at the edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nsa_eval.kernels import utils
from nsa_eval.kernels.attention.checks import check_attention_args
from nsa_eval.kernels.utils import LOG2E, block_table, check_triton_device, dot_precision, interpreting

# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def load_rows(base, rows, cols, stride_row, n_rows, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr, ROW_MASK: tl.constexpr):
    """Tile [len(rows), BLOCK_COLS] of a row-major matrix (row stride `stride_row`, unit column stride);
    rows >= n_rows (when ROW_MASK) and columns >= N_COLS read as 0."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if ROW_MASK:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _store_rows(base, x, rows, cols, stride_row, n_rows, N_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit
def _visible(m, n, T_seq, S_seq, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query m sees key n (broadcast shapes): n < S, causal n <= m + S - T, window n > m + S - T - w."""
    pos = m + (S_seq - T_seq)
    mask = (n < S_seq) & (m < T_seq)
    if IS_CAUSAL:
        mask = mask & (n <= pos)
    if HAS_WINDOW:
        mask = mask & (n > pos - window)
    return mask


@triton.jit
def _key_range(start_m, T_seq, S_seq, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys that queries [start_m, start_m + BLOCK_M) see: [lo, hi), BLOCK_N-aligned from lo; the part
    [full_lo, full_hi) is visible to every one of them (no mask needed)."""
    diag = S_seq - T_seq
    if IS_CAUSAL:
        hi = tl.minimum(S_seq, start_m + BLOCK_M + diag)
        full_hi = (start_m + diag + 1) // BLOCK_N * BLOCK_N
    else:
        hi = S_seq
        full_hi = S_seq // BLOCK_N * BLOCK_N
    lo = tl.zeros([], tl.int32)
    full_lo = tl.zeros([], tl.int32)
    if HAS_WINDOW:
        lo = tl.maximum(start_m + diag - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M + diag - window, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, lo), hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(start_n, T_seq, S_seq, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Queries that see keys [start_n, start_n + BLOCK_N): [lo, hi), BLOCK_M-aligned from lo; every query
    block in [full_lo, full_hi) sees all of these keys (rows past the key end only feed unstored rows)."""
    diag = S_seq - T_seq
    lo = tl.zeros([], tl.int32)
    full_lo = tl.zeros([], tl.int32)
    if IS_CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    hi = T_seq
    full_hi = T_seq // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(T_seq, start_n + BLOCK_N - 1 - diag + window)
        full_hi = tl.minimum(full_hi, tl.cdiv(tl.maximum(start_n + window - diag - BLOCK_M + 1, 0), BLOCK_M) * BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence(CU_SEQLENS, BLOCK_TABLE, pid, T, S, BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """(first row of the sequence, its T, its S, start of this program's block) for program `pid`."""
    if IS_VARLEN:
        seq = tl.load(BLOCK_TABLE + 2 * pid)
        start = tl.load(BLOCK_TABLE + 2 * pid + 1) * BLOCK
        bos = tl.load(CU_SEQLENS + seq).to(tl.int64)
        T_seq = (tl.load(CU_SEQLENS + seq + 1) - bos).to(tl.int32)
        S_seq = T_seq
    else:
        if HEAVY_LAST:  # causal: late query blocks see the most keys, so start them first
            start = (tl.num_programs(0) - 1 - pid) * BLOCK
        else:
            start = pid * BLOCK
        bos = tl.zeros([], tl.int64)
        T_seq = T
        S_seq = S
    return bos, T_seq, S_seq, start


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
               lo, hi, T_seq, S_seq, window, scale_log2,
               HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K_head, offs_n, offs_dk, stride_kt, S_seq, HEAD_DK, BLOCK_DK, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], T_seq, S_seq, window, IS_CAUSAL, HAS_WINDOW)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(V_head, offs_n, offs_dv, stride_vt, S_seq, HEAD_DV, BLOCK_DV, MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, BLOCK_TABLE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, S, HQ, window, scale_log2,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one head. Writes O [B, T, HQ, Dv] and LSE [B, HQ, T] (natural log)."""
    hq = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bos, T_seq, S_seq, start_m = _sequence(CU_SEQLENS, BLOCK_TABLE, tl.program_id(0), T, S, BLOCK_M, IS_VARLEN, IS_CAUSAL)
    h = hq // GROUP
    Q_head = Q + b * stride_qb + bos * stride_qt + hq * stride_qh
    K_head = K + b * stride_kb + bos * stride_kt + h * stride_kh
    V_head = V + b * stride_vb + bos * stride_vt + h * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q_head, offs_m, offs_dk, stride_qt, T_seq, HEAD_DK, BLOCK_DK, True)

    # m_i starts finite so that a row whose first keys are all masked gives exp2(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, T_seq, S_seq, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                               lo, full_lo, T_seq, S_seq, window, scale_log2, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                               BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                               full_lo, full_hi, T_seq, S_seq, window, scale_log2, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                               BLOCK_N, False, IS_CAUSAL, HAS_WINDOW, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                               full_hi, hi, T_seq, S_seq, window, scale_log2, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                               BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows past T can have no visible key
    o = acc / l_safe[:, None]
    _store_rows(O + b * stride_ob + bos * stride_ot + hq * stride_oh, o, offs_m, offs_dv, stride_ot, T_seq, HEAD_DV)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + (b * HQ + hq) * T + bos + offs_m, lse, mask=offs_m < T_seq)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, T, HQ,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DELTA [B, HQ, T] = rowsum(O * dO) in float32."""
    hq = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    o = load_rows(O + b * stride_ob + hq * stride_oh, rows, cols, stride_ot, T, HEAD_DV, BLOCK_DV, True)
    do = load_rows(DO + b * stride_dob + hq * stride_doh, rows, cols, stride_dot, T, HEAD_DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * HQ + hq) * T + rows, delta, mask=rows < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qt, stride_dot,
                    offs_n, offs_dk, offs_dv, lo, hi, T_seq, S_seq, window, scale_log2,
                    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(Q_head, offs_m, offs_dk, stride_qt, T_seq, HEAD_DK, BLOCK_DK, MASKED)
        do = load_rows(DO_head, offs_m, offs_dv, stride_dot, T_seq, HEAD_DV, BLOCK_DV, MASKED)
        if MASKED:
            lse = tl.load(LSE_head + offs_m, mask=offs_m < T_seq, other=float("inf"))
            delta = tl.load(DELTA_head + offs_m, mask=offs_m < T_seq, other=0.0)
        else:
            lse = tl.load(LSE_head + offs_m)
            delta = tl.load(DELTA_head + offs_m)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(qk_t * scale_log2 - lse[None, :] * 1.4426950408889634)
        if MASKED:
            visible = _visible(offs_m[None, :], offs_n[:, None], T_seq, S_seq, window, IS_CAUSAL, HAS_WINDOW)
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, BLOCK_TABLE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    T, S, HQ, window, scale, scale_log2,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_N keys of one KV head, summing over the GROUP query heads that share it.
    Writes DK [B, S, H, Dk] and DV [B, S, H, Dv]."""
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bos, T_seq, S_seq, start_n = _sequence(CU_SEQLENS, BLOCK_TABLE, tl.program_id(0), T, S, BLOCK_N, IS_VARLEN, False)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(K + b * stride_kb + bos * stride_kt + h * stride_kh, offs_n, offs_dk, stride_kt, S_seq, HEAD_DK, BLOCK_DK, True)
    v = load_rows(V + b * stride_vb + bos * stride_vt + h * stride_vh, offs_n, offs_dv, stride_vt, S_seq, HEAD_DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, full_lo, full_hi, hi = _query_range(start_n, T_seq, S_seq, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for g in range(GROUP):
        hq = h * GROUP + g
        Q_head = Q + b * stride_qb + bos * stride_qt + hq * stride_qh
        DO_head = DO + b * stride_dob + bos * stride_dot + hq * stride_doh
        LSE_head = LSE + (b * HQ + hq) * T + bos
        DELTA_head = DELTA + (b * HQ + hq) * T + bos
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qt, stride_dot,
                                 offs_n, offs_dk, offs_dv, lo, full_lo, T_seq, S_seq, window, scale_log2,
                                 HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_M, True, IS_CAUSAL, HAS_WINDOW, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qt, stride_dot,
                                 offs_n, offs_dk, offs_dv, full_lo, full_hi, T_seq, S_seq, window, scale_log2,
                                 HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_M, False, IS_CAUSAL, HAS_WINDOW, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qt, stride_dot,
                                 offs_n, offs_dk, offs_dv, full_hi, hi, T_seq, S_seq, window, scale_log2,
                                 HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_M, True, IS_CAUSAL, HAS_WINDOW, PRECISION)
    _store_rows(DK + b * stride_dkb + bos * stride_dkt + h * stride_dkh, dk * scale, offs_n, offs_dk, stride_dkt, S_seq, HEAD_DK)
    _store_rows(DV + b * stride_dvb + bos * stride_dvt + h * stride_dvh, dv, offs_n, offs_dv, stride_dvt, S_seq, HEAD_DV)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse_log2, delta, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                  lo, hi, T_seq, S_seq, window, scale_log2,
                  HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K_head, offs_n, offs_dk, stride_kt, S_seq, HEAD_DK, BLOCK_DK, MASKED)
        v = load_rows(V_head, offs_n, offs_dv, stride_vt, S_seq, HEAD_DV, BLOCK_DV, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(qk * scale_log2 - lse_log2[:, None])
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], T_seq, S_seq, window, IS_CAUSAL, HAS_WINDOW)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, BLOCK_TABLE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    T, S, HQ, window, scale, scale_log2,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one head. Writes DQ [B, T, HQ, Dk]."""
    hq = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bos, T_seq, S_seq, start_m = _sequence(CU_SEQLENS, BLOCK_TABLE, tl.program_id(0), T, S, BLOCK_M, IS_VARLEN, IS_CAUSAL)
    h = hq // GROUP
    K_head = K + b * stride_kb + bos * stride_kt + h * stride_kh
    V_head = V + b * stride_vb + bos * stride_vt + h * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q + b * stride_qb + bos * stride_qt + hq * stride_qh, offs_m, offs_dk, stride_qt, T_seq, HEAD_DK, BLOCK_DK, True)
    do = load_rows(DO + b * stride_dob + bos * stride_dot + hq * stride_doh, offs_m, offs_dv, stride_dot, T_seq, HEAD_DV, BLOCK_DV, True)
    row_in = offs_m < T_seq
    lse_log2 = tl.load(LSE + (b * HQ + hq) * T + bos + offs_m, mask=row_in, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + (b * HQ + hq) * T + bos + offs_m, mask=row_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, T_seq, S_seq, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                       lo, full_lo, T_seq, S_seq, window, scale_log2, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                       BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                       full_lo, full_hi, T_seq, S_seq, window, scale_log2, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                       BLOCK_N, False, IS_CAUSAL, HAS_WINDOW, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, K_head, V_head, stride_kt, stride_vt, offs_m, offs_dk, offs_dv,
                       full_hi, hi, T_seq, S_seq, window, scale_log2, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                       BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, PRECISION)
    _store_rows(DQ + b * stride_dqb + bos * stride_dqt + hq * stride_dqh, dq * scale, offs_m, offs_dk, stride_dqt, T_seq, HEAD_DK)


# ----------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """Block shape and launch settings of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def forward_tiles(block_dk: int, block_dv: int, dtype: torch.dtype) -> Tiles:
    """Tiles of the forward kernel for padded head dims (Hopper-tuned for 16-bit inputs; float32 tiles
    are smaller to fit shared memory; small in the interpreter)."""
    if interpreting():
        return Tiles(32, 32, 4, 1)
    wide = max(block_dk, block_dv)
    if dtype == torch.float32:
        return Tiles(64, 32, 4, 2) if wide <= 128 else Tiles(32, 32, 4, 2)
    if wide <= 64:
        return Tiles(128, 64, 4, 3)
    if wide <= 128:
        return Tiles(128, 128, 8, 3)  # H200, 16k, bf16: 8.7 ms vs 9.1 for (128, 64, 8, 3)
    return Tiles(64, 32, 4, 2)


def backward_tiles(block_dk: int, block_dv: int, dtype: torch.dtype) -> tuple[Tiles, Tiles]:
    """(dk/dv kernel, dq kernel) tiles for padded head dims."""
    if interpreting():
        return Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1)
    wide = max(block_dk, block_dv)
    if dtype == torch.float32:
        tiles = Tiles(32, 32, 4, 2) if wide <= 128 else Tiles(32, 32, 4, 1)
    elif wide <= 64:
        tiles = Tiles(64, 64, 4, 3)
    elif wide <= 128:  # H200, 16k, bf16: 28.7 ms vs 29.8 for (64, 64, 4, 2) in both
        return Tiles(64, 128, 8, 2), Tiles(128, 64, 8, 2)
    else:
        tiles = Tiles(32, 32, 4, 2)
    return tiles, tiles


def _common(q, k, v):
    B, T, HQ, Dk = q.shape
    S, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    return B, T, HQ, Dk, S, H, Dv, triton.next_power_of_2(max(Dk, 16)), triton.next_power_of_2(max(Dv, 16))


def attention_fwd(q, k, v, causal, window, cu_seqlens, lengths, scale, tiles: Tiles | None = None):
    """q [B, T, HQ, Dk], k [B, S, H, Dk], v [B, S, H, Dv] (unit stride in the head dim) ->
    o [B, T, HQ, Dv] (q's dtype), lse [B, HQ, T] float32 (natural log). `lengths`: the sequence lengths
    from cu_seqlens (a host list) or None."""
    B, T, HQ, Dk, S, H, Dv, BDK, BDV = _common(q, k, v)
    tiles = tiles or forward_tiles(BDK, BDV, q.dtype)
    o = utils.new_output((B, T, HQ, Dv), q.dtype, q.device)
    lse = utils.new_output((B, HQ, T), torch.float32, q.device)
    if cu_seqlens is None:
        table = None
        grid = (triton.cdiv(T, tiles.block_m), HQ, B)
    else:
        table = block_table(lengths, tiles.block_m, q.device, heavy_last=True)
        grid = (table.shape[0], HQ, 1)
    _attention_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, S, HQ, window or 0, scale * LOG2E,
        GROUP=HQ // H, HEAD_DK=Dk, HEAD_DV=Dv, BLOCK_DK=BDK, BLOCK_DV=BDV,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, IS_CAUSAL=causal, HAS_WINDOW=window is not None,
        IS_VARLEN=cu_seqlens is not None, PRECISION=dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return o, lse


def attention_bwd(q, k, v, o, lse, do, causal, window, cu_seqlens, lengths, scale,
                  tiles: tuple[Tiles, Tiles] | None = None):
    """Gradients of attention_fwd: do [B, T, HQ, Dv] -> dq [B, T, HQ, Dk], dk [B, S, H, Dk], dv [B, S, H, Dv]."""
    B, T, HQ, Dk, S, H, Dv, BDK, BDV = _common(q, k, v)
    dkdv_tiles, dq_tiles = tiles or backward_tiles(BDK, BDV, q.dtype)
    delta = utils.new_output((B, HQ, T), torch.float32, q.device)
    pre_block = 64
    _attention_bwd_preprocess_kernel[(triton.cdiv(T, pre_block), HQ, B)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T, HQ,
        HEAD_DV=Dv, BLOCK_DV=BDV, BLOCK_M=pre_block,
    )
    dq = utils.new_output(q.shape, q.dtype, q.device)
    dk = utils.new_output(k.shape, k.dtype, k.device)
    dv = utils.new_output(v.shape, v.dtype, v.device)
    settings = dict(
        GROUP=HQ // H, HEAD_DK=Dk, HEAD_DV=Dv, BLOCK_DK=BDK, BLOCK_DV=BDV, IS_CAUSAL=causal,
        HAS_WINDOW=window is not None, IS_VARLEN=cu_seqlens is not None, PRECISION=dot_precision(q.dtype),
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    if cu_seqlens is None:
        table_n, grid_n = None, (triton.cdiv(S, dkdv_tiles.block_n), H, B)
        table_m, grid_m = None, (triton.cdiv(T, dq_tiles.block_m), HQ, B)
    else:
        table_n = block_table(lengths, dkdv_tiles.block_n, q.device, heavy_last=False)
        table_m = block_table(lengths, dq_tiles.block_m, q.device, heavy_last=True)
        grid_n, grid_m = (table_n.shape[0], H, 1), (table_m.shape[0], HQ, 1)
    _attention_bwd_dkdv_kernel[grid_n](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, table_n, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        T, S, HQ, window or 0, scale, scale * LOG2E, **settings,
        BLOCK_M=dkdv_tiles.block_m, BLOCK_N=dkdv_tiles.block_n,
        num_warps=dkdv_tiles.num_warps, num_stages=dkdv_tiles.num_stages,
    )
    _attention_bwd_dq_kernel[grid_m](
        q, k, v, do, lse, delta, dq, cu_seqlens, table_m, *strides,
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, S, HQ, window or 0, scale, scale * LOG2E, **settings,
        BLOCK_M=dq_tiles.block_m, BLOCK_N=dq_tiles.block_n,
        num_warps=dq_tiles.num_warps, num_stages=dq_tiles.num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class AttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (o, lse [B, HQ, T]); lse carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, cu_seqlens, scale):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        lengths = None if cu_seqlens is None else cu_seqlens.diff().tolist()
        o, lse = attention_fwd(q, k, v, causal, window, cu_seqlens, lengths, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.settings = (causal, window, lengths, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        causal, window, lengths, scale = ctx.settings
        dq, dk, dv = attention_bwd(q, k, v, o, lse, unit_stride(do), causal, window, cu_seqlens, lengths, scale)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------


def attention(q, k, v, *, causal=True, window=None, cu_seqlens=None, scale=None, return_lse=False):
    """Scaled dot-product attention in Triton, differentiable in q, k and v; arguments, shapes and masks:
    reference.attention. Inputs float16, bfloat16 or float32 with head dims <= 256; float32 inputs are multiplied in
    full float32 ("ieee"), 16-bit ones on the tensor cores with float32 accumulation. lse (return_lse) is a strided
    view [B, T, HQ] of the kernel's [B, HQ, T]."""
    check_attention_args(q, k, v, causal, window, cu_seqlens, scale, triton=True)
    check_triton_device("attention", q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = AttentionFunction.apply(q, k, v, causal, window, cu_seqlens, scale)
    return (o, lse.transpose(1, 2)) if return_lse else o
