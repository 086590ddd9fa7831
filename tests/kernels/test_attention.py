"""Triton full attention (forward and every gradient) against the float64 PyTorch reference.

Without a GPU the Triton kernels run in interpreter mode (tests/conftest.py), so shapes stay small and
16-bit tests use float16 (the interpreter computes tl.dot on bfloat16 wrongly); on a GPU bfloat16 is
tested too. Every kernel output buffer starts as NaN, so an element a kernel fails to write shows up.
"""

from __future__ import annotations

import pytest
import torch

import nsa_eval.kernels.attention as attention_op
from nsa_eval.kernels.attention import parallel, reference
from kernel_checks import rel_err

pytestmark = pytest.mark.usefixtures("nan_outputs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# ||out - ref|| / ||ref|| bounds (output, gradients): float32 is exact up to rounding; 16-bit inputs
# round P to 16 bits before P @ V and dS before dS @ K / dS^T @ Q.
BOUNDS = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}


def check_against_reference(B, T, S, HQ, H, Dk, Dv, dtype, *, causal=True, window=None, cu_seqlens=None, scale=None):
    """Forward, lse and dq/dk/dv of the Triton path against the reference on float64 copies."""
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + S + HQ + Dk)
    q, k, v = (
        torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
        for shape in ((B, T, HQ, Dk), (B, S, H, Dk), (B, S, H, Dv))
    )
    o, lse = parallel.attention(q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens, scale=scale, return_lse=True)
    do = torch.randn(o.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = reference.attention(
        q64, k64, v64, causal=causal, window=window, cu_seqlens=cu_seqlens, scale=scale, return_lse=True
    )
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())

    bound_out, bound_grad = BOUNDS[dtype]
    assert o.shape == (B, T, HQ, Dv) and o.dtype == dtype
    assert lse.shape == (B, T, HQ) and lse.dtype == torch.float32
    for name, x in [("o", o), ("lse", lse), ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])]:
        assert not torch.isnan(x).any(), f"{name} has unwritten (NaN) elements"
    assert rel_err(o, o_ref) < bound_out
    assert rel_err(lse, lse_ref) < 1e-5
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(g, g_ref) < bound_grad, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, T, S, HQ, H, Dk, Dv",
    [
        (2, 100, 100, 4, 1, 64, 64),  # batch > 1, GQA 4, T not a multiple of the blocks
        (1, 40, 40, 16, 1, 64, 64),  # GQA 16
        (1, 70, 70, 2, 2, 128, 128),  # GQA 1, head dim 128
        (1, 50, 50, 2, 1, 192, 128),  # Dk = 192, Dv = 128 (the paper's NSA heads)
        (1, 30, 95, 4, 2, 64, 64),  # T < S: causal aligned bottom-right
        (2, 1, 67, 4, 2, 64, 64),  # T = 1
    ],
)
@pytest.mark.slow
def test_causal_matches_reference(B, T, S, HQ, H, Dk, Dv, dtype):
    check_against_reference(B, T, S, HQ, H, Dk, Dv, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
def test_sliding_window_matches_reference(dtype):
    check_against_reference(2, 130, 130, 4, 2, 64, 64, dtype, window=37)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_with_fewer_queries_than_keys(dtype):
    check_against_reference(1, 45, 110, 4, 1, 64, 64, dtype, window=50, scale=0.3)


@pytest.mark.parametrize("T, S", [(50, 33), (20, 90)])
def test_non_causal_matches_reference(T, S):
    check_against_reference(1, T, S, 4, 2, 64, 64, torch.float32, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.slow
def test_varlen_matches_reference(window, dtype):
    # an empty sequence, a one-token one, and lengths that are not multiples of the blocks
    cu_seqlens = torch.tensor([0, 5, 5, 70, 71, 130], dtype=torch.int32, device=DEVICE)
    check_against_reference(1, 130, 130, 4, 1, 64, 64, dtype, window=window, cu_seqlens=cu_seqlens)


def test_varlen_equals_separate_calls():
    """Packing changes nothing: each packed sequence gives what it gives alone."""
    gen = torch.Generator().manual_seed(3)
    lengths = [33, 64, 7]
    q = torch.randn(1, sum(lengths), 4, 64, generator=gen).to(DEVICE)
    k = torch.randn(1, sum(lengths), 2, 64, generator=gen).to(DEVICE)
    v = torch.randn(1, sum(lengths), 2, 64, generator=gen).to(DEVICE)
    cu_seqlens = torch.tensor([0, 33, 97, 104], dtype=torch.int32, device=DEVICE)
    packed = parallel.attention(q, k, v, cu_seqlens=cu_seqlens)
    for a, b in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:]):
        alone = parallel.attention(q[:, a:b], k[:, a:b], v[:, a:b])
        assert rel_err(packed[:, a:b], alone) < 1e-6


def test_public_function_picks_reference_on_cpu_and_triton_on_cuda():
    q = torch.randn(1, 20, 4, 64, device=DEVICE)
    k = torch.randn(1, 20, 2, 64, device=DEVICE)
    v = torch.randn(1, 20, 2, 64, device=DEVICE)
    expected = parallel.attention if DEVICE == "cuda" else reference.attention
    assert torch.equal(attention_op.attention(q, k, v, window=8), expected(q, k, v, window=8))


def _qkv(q_shape=(1, 16, 4, 64), k_shape=(1, 16, 2, 64), v_shape=(1, 16, 2, 64), dtype=torch.float32):
    return torch.randn(q_shape, dtype=dtype), torch.randn(k_shape, dtype=dtype), torch.randn(v_shape, dtype=dtype)


BAD_INPUTS = [
    (dict(q_shape=(16, 4, 64)), {}, "q must be 4-D"),
    (dict(v_shape=(1, 16, 2)), {}, "v must be 4-D"),
    (dict(q_shape=(1, 16, 3, 64)), {}, "not a multiple of the H=2"),
    (dict(k_shape=(1, 16, 2, 32), v_shape=(1, 16, 2, 64)), {}, "k head dim 32"),
    (dict(k_shape=(1, 17, 2, 64)), {}, "must agree on [B, S, H]"),
    (dict(q_shape=(1, 20, 4, 64)), {}, "T=20 queries > S=16 keys"),
    ({}, dict(window=0), "window must be None or a positive int"),
    ({}, dict(window=4, causal=False), "window needs causal=True"),
    ({}, dict(scale=-1.0), "scale must be"),
    ({}, dict(cu_seqlens=torch.tensor([0, 16], dtype=torch.int64)), "cu_seqlens must be a 1-D int32"),
    ({}, dict(cu_seqlens=torch.tensor([0, 9, 15], dtype=torch.int32)), "cu_seqlens must rise from 0 to T=16"),
    (dict(q_shape=(2, 16, 4, 64), k_shape=(2, 16, 2, 64), v_shape=(2, 16, 2, 64)),
     dict(cu_seqlens=torch.tensor([0, 16], dtype=torch.int32)), "cu_seqlens needs packed inputs with B == 1"),
]


@pytest.mark.parametrize("impl", [reference.attention, parallel.attention], ids=["reference", "triton"])
@pytest.mark.parametrize("shapes, options, message", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(impl, shapes, options, message):
    q, k, v = _qkv(**shapes)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        impl(q, k, v, **options)


@pytest.mark.parametrize("impl", [reference.attention, parallel.attention], ids=["reference", "triton"])
def test_dtype_mismatch_raises(impl):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k has dtype torch.float16 but q has torch.float32"):
        impl(q, k.half(), v)


def test_triton_rejects_head_dims_over_256():
    q, k, v = _qkv((1, 4, 1, 512), (1, 4, 1, 512), (1, 4, 1, 64))
    with pytest.raises(ValueError, match="at most 256"):
        parallel.attention(q, k, v)
