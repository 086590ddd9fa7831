"""One decoding step of full attention over a KV cache in Triton (flash-decoding).

The keys of each sequence are cut into `num_splits` equal ranges; one program takes one range of one KV
head of one sequence and all GROUP = HQ // H query heads that share that head, so each K/V row is read
once per group. It writes a partial output and log-sum-exp per split; a second kernel combines them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa_eval.kernels import utils
from nsa_eval.kernels.attention.checks import check_decode_args
from nsa_eval.kernels.attention.parallel import load_rows, unit_stride
from nsa_eval.kernels.utils import LOG2E, check_triton_device, dot_precision, interpreting

# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    HQ, window, scale_log2, split_len, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (split, h, b): keys [split * split_len, +split_len) of KV head h of sequence b, for the
    GROUP query heads h * GROUP + g. Writes O_PART [B, HQ, num_splits, BLOCK_DV] (normalised) and
    LSE_PART [B, HQ, num_splits] (natural log, -inf for a split without visible keys)."""
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.load(SEQLENS + b)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    first = tl.zeros([], tl.int32)
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
        lo = tl.maximum(lo, first // BLOCK_N * BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    heads = h * GROUP + offs_g
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_dk[None, :],
        mask=(offs_g[:, None] < GROUP) & (offs_dk[None, :] < HEAD_DK), other=0.0,
    )
    K_head = K + b * stride_kb + h * stride_kh
    V_head = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        if HAS_WINDOW:
            valid = valid & (offs_n >= first)
        k = load_rows(K_head, offs_n, offs_dk, stride_kt, hi, HEAD_DK, BLOCK_DK, True)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(V_head, offs_n, offs_dv, stride_vt, hi, HEAD_DV, BLOCK_DV, True)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    part = (b * HQ + heads) * num_splits + split
    head_in = offs_g < GROUP
    tl.store(O_PART + part[:, None] * BLOCK_DV + offs_dv[None, :], acc / l_safe[:, None], mask=head_in[:, None])
    tl.store(LSE_PART + part, lse, mask=head_in)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, O, LSE, stride_ob, stride_oh, HQ, num_splits,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (hq, b): O [B, HQ, Dv] and LSE [B, HQ] from the num_splits partial results."""
    hq = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = (b * HQ + hq) * num_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full([], -1.0e30, tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(LSE_PART + row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        o = tl.load(O_PART + (row + offs_s)[:, None] * BLOCK_DV + offs_dv[None, :],
                    mask=(offs_s < num_splits)[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.exp(lse - m_new)
        alpha = tl.exp(m - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l = l * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(O + b * stride_ob + hq * stride_oh + offs_dv, (acc / l).to(O.dtype.element_ty), mask=offs_dv < HEAD_DV)
    tl.store(LSE + b * HQ + hq, m + tl.log(l))


# ----------------------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------------------

_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def decode_tiles(block_dk: int, block_dv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel (Hopper-tuned for 16-bit inputs; small in
    the interpreter)."""
    if interpreting():
        return 32, 4, 1
    if dtype == torch.float32 or max(block_dk, block_dv) > 128:
        return 32, 4, 2
    return 128, 4, 3  # H200, 64k, batch 16, bf16: 0.53 ms vs 0.58 for (64, 4, 3)


def num_splits_for(batch: int, kv_heads: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Splits per sequence: enough programs for about four per multiprocessor, at most 256, and no
    split shorter than one block."""
    if interpreting() or device.type != "cuda":
        return min(4, triton.cdiv(s_max, block_n))
    wanted = triton.cdiv(4 * _sm_count(device), batch * kv_heads)
    return max(1, min(wanted, 256, triton.cdiv(s_max, block_n)))


def attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, window, scale, tiles=None, num_splits=None):
    """q [B, HQ, Dk], caches [B, S_max, H, D] (unit stride in the head dim), cache_seqlens int32 [B]
    -> o [B, HQ, Dv] (q's dtype), lse [B, HQ] float32. `tiles` = (BLOCK_N, num_warps, num_stages)."""
    B, HQ, Dk = q.shape
    S_max, H, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    BDK, BDV = triton.next_power_of_2(max(Dk, 16)), triton.next_power_of_2(max(Dv, 16))
    block_n, num_warps, num_stages = tiles or decode_tiles(BDK, BDV, q.dtype)
    group = HQ // H
    num_splits = num_splits or num_splits_for(B, H, S_max, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
    o_part = utils.new_output((B, HQ, num_splits, BDV), torch.float32, q.device)
    lse_part = utils.new_output((B, HQ, num_splits), torch.float32, q.device)
    _decode_split_kernel[(num_splits, H, B)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ, window or 0, scale * LOG2E, split_len, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DK=Dk, HEAD_DV=Dv,
        BLOCK_DK=BDK, BLOCK_DV=BDV, BLOCK_N=block_n, HAS_WINDOW=window is not None,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    o = utils.new_output((B, HQ, Dv), q.dtype, q.device)
    lse = utils.new_output((B, HQ), torch.float32, q.device)
    _decode_combine_kernel[(HQ, B)](
        o_part, lse_part, o, lse, o.stride(0), o.stride(1), HQ, num_splits,
        HEAD_DV=Dv, BLOCK_DV=BDV, BLOCK_S=16, num_warps=4,
    )
    return o, lse


# ----------------------------------------------------------------------------------------------------
# public function (inference only: no autograd)
# ----------------------------------------------------------------------------------------------------


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, return_lse=False):
    """One decoding step in Triton (split-K over the cache, no gradient); arguments and shapes:
    reference.attention_decode. Inputs float16, bfloat16 or float32; cache_seqlens' values are not checked here
    (that would cost a device-to-host copy per step)."""
    check_decode_args(q, k_cache, v_cache, cache_seqlens, window, scale, triton=True)
    check_triton_device("attention_decode", q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k_cache, v_cache = unit_stride(q), unit_stride(k_cache), unit_stride(v_cache)
    with torch.no_grad():
        o, lse = attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, window, scale)
    return (o, lse) if return_lse else o
