"""The pointwise layer kernels (add_rms_norm, rotary_, silu_mul) and the KV-cache write (cache_write_) against their
PyTorch references.

Without a GPU the Triton kernels run in interpreter mode (tests/conftest.py) on float32 and float16; the last two
tests run bfloat16 on a GPU at the paper's shapes. cache_write_ only copies, so it must equal its reference bit for
bit and leave every other cache element as it was. Every buffer a kernel writes starts as NaN (nan_outputs), so an
element a kernel fails to write shows up. Bounds on ||out - ref|| / ||ref||: the kernels do the reference's float32
math and roundings, so only the order of the mean-square sum (and fused multiply-adds on a GPU) differ: float32
1e-6; 16-bit outputs may flip an element's last bit (float16 2^-11, bfloat16 2^-8 relative), which stays well
under 1e-3 (float16) and 5e-3 (bfloat16) over a whole tensor. In 16 bits, fewer than 1% of the elements may differ
from the reference at all: a kernel that skips one of the reference's roundings (the normalised row before the
weight, silu before the product) changes about a quarter of them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nsa_eval.kernels import layers
from nsa_eval.kernels.layers import cache_write, norm, reference, rotary, swiglu
from kernel_checks import rel_err

pytestmark = pytest.mark.usefixtures("nan_outputs")

BOUNDS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def check_close(out, ref):
    """rel_err within the dtype's bound; in 16 bits, also < 1% of the elements differ from ref at all."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < BOUNDS[out.dtype]
    if out.dtype != torch.float32:
        assert (out != ref).float().mean().item() < 0.01, "16-bit roundings differ from the reference's"


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device, dtype)


# ----------------------------------------------------------------------------------------------------
# add_rms_norm
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("D", [64, 96, 2560])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype, rows, D, with_residual):
    x = randn(1, rows, D, dtype=dtype, seed=rows + D) * 3
    weight = randn(D, dtype=dtype, seed=1)
    residual = randn(1, rows, D, dtype=dtype, seed=2) if with_residual else None
    normed, summed = norm.add_rms_norm(x, weight, 1e-6, residual)
    normed_ref, summed_ref = reference.add_rms_norm(x, weight, 1e-6, residual)
    assert normed.shape == x.shape and normed.dtype == dtype and normed.is_contiguous()
    check_close(normed, normed_ref)
    if with_residual:
        assert torch.equal(summed, summed_ref)  # one add in float32, rounded once: bit-identical
    else:
        assert summed is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_on_strided_rows(dtype):
    """x and residual as column slices of wider tensors (row stride > D): the rows are read at their stride."""
    wide_x, wide_r = randn(2, 5, 100, dtype=dtype, seed=3), randn(2, 5, 110, dtype=dtype, seed=4)
    x, residual = wide_x[..., :96], wide_r[..., 7:103]
    weight = randn(96, dtype=dtype, seed=5)
    normed, summed = norm.add_rms_norm(x, weight, 1e-5, residual)
    normed_ref, summed_ref = reference.add_rms_norm(x, weight, 1e-5, residual)
    check_close(normed, normed_ref)
    assert torch.equal(summed, summed_ref)


def test_reference_add_rms_norm_equals_torch_rms_norm():
    x, weight = randn(4, 7, 96, seed=6), randn(96, seed=7)
    normed, _ = reference.add_rms_norm(x, weight, 1e-6)
    assert rel_err(normed, F.rms_norm(x, (96,), weight, 1e-6)) < 1e-6


# ----------------------------------------------------------------------------------------------------
# rotary_
# ----------------------------------------------------------------------------------------------------


def rope_tables(B, T, D, table_rank):
    """cos, sin float32 of positions 0..T-1 offset per sequence (as the model's rope_tables), [B, T, 1, D/2] or
    [B, T, D/2]."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    positions = torch.arange(T, dtype=torch.float32)[None] + 5 * torch.arange(B, dtype=torch.float32)[:, None]
    angles = positions[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return (cos[:, :, None], sin[:, :, None]) if table_rank == 4 else (cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, T, R, D, table_rank",
    [
        (1, 3, 4, 64, 4),
        (2, 3, 5, 96, 3),  # odd R, D/2 = 48 not a power of 2, tables [B, T, D/2]
        (1, 2, 76, 192, 4),  # the paper's heads: R = 76 in groups of 8, D/2 = 96
        (2, 1, 3, 128, 3),
    ],
)
def test_rotary_on_a_column_slice_matches_reference(dtype, B, T, R, D, table_rank):
    """x is the first R*D columns of a [B, T, R*D + 13] projection output; the other columns stay untouched."""
    wide = randn(B, T, R * D + 13, dtype=dtype, seed=R + D)
    expected = wide.clone()
    cos, sin = (t.to(DEVICE) for t in rope_tables(B, T, D, table_rank))
    x = wide[..., : R * D].view(B, T, R, D)
    assert not x.is_contiguous()
    out = rotary.rotary_(x, cos, sin)
    reference.rotary_(expected[..., : R * D].view(B, T, R, D), cos, sin)
    assert out is x
    check_close(wide[..., : R * D], expected[..., : R * D])
    assert torch.equal(wide[..., R * D:], expected[..., R * D:])


def test_reference_rotary_is_the_rotate_half_formula():
    """One hand-made vector: D = 4, halves (1, 2) and (3, 4), angles 0.3 and 1.1."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    angles = (0.3, 1.1)
    cos = torch.tensor([math.cos(a) for a in angles]).view(1, 1, 1, 2)
    sin = torch.tensor([math.sin(a) for a in angles]).view(1, 1, 1, 2)
    c0, c1, s0, s1 = math.cos(0.3), math.cos(1.1), math.sin(0.3), math.sin(1.1)
    expected = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]
    reference.rotary_(x, cos, sin)
    assert torch.allclose(x.flatten(), torch.tensor(expected), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# silu_mul
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, I", [((1,), 50), ((3, 4), 50), ((2,), 1200)])  # 1200: two column blocks
def test_silu_mul_matches_reference(dtype, shape, I):
    gate_up = randn(*shape, 2 * I, dtype=dtype, seed=I) * 3
    out = swiglu.silu_mul(gate_up)
    assert out.shape == (*shape, I) and out.dtype == dtype and out.is_contiguous()
    check_close(out, reference.silu_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_strided_rows(dtype):
    gate_up = randn(5, 2 * 50 + 6, dtype=dtype, seed=8)[:, 3:103]
    check_close(swiglu.silu_mul(gate_up), reference.silu_mul(gate_up))


def test_reference_silu_mul_is_silu_of_gate_times_up():
    gate_up = torch.tensor([[0.5, -2.0, 3.0, 4.0]])
    silu = [0.5 / (1 + math.exp(-0.5)), -2.0 / (1 + math.exp(2.0))]
    assert torch.allclose(reference.silu_mul(gate_up), torch.tensor([[silu[0] * 3.0, silu[1] * 4.0]]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# cache_write_
# ----------------------------------------------------------------------------------------------------

# (S, H, D, cache width): a cache [B, S, H, width] written through its [..., :D] view, as the model's values
# (zero-padded to the key width). The six: the model's k, v, k_ring, v_ring, k_win, v_win with Dk = 96, Dv = 64.
CACHE_PAIRS = {
    1: [(7, 3, 96, 96)],
    3: [(9, 2, 64, 64), (5, 3, 48, 80), (6, 1, 96, 96)],
    6: [(11, 2, 96, 96), (11, 2, 64, 96), (4, 2, 96, 96), (4, 2, 64, 64), (8, 2, 96, 96), (8, 2, 64, 64)],
}


def cache_write_inputs(pairs, dtype, B=3, seed=0, device=DEVICE):
    """(caches, dests, sources, slots) for pairs of (S, H, D, width): random caches [B, S, H, width] and their
    [..., :D] views; sources are column slices of one fused projection output [B, 1, sum(H*D) + 5], except the
    first, x[:, 0] of a [B, 1, H, D] view; slots alternate int64 and int32, the last two pairs share one tensor."""
    caches = [randn(B, S, H, width, dtype=dtype, seed=seed + i, device=device) for i, (S, H, _, width) in
              enumerate(pairs)]
    dests = [cache[..., :D] for cache, (_, _, D, _) in zip(caches, pairs)]
    projection = randn(B, 1, sum(H * D for _, H, D, _ in pairs) + 5, dtype=dtype, seed=seed + 10, device=device)
    sources, offset = [], 0
    for _, H, D, _ in pairs:
        sources.append(projection[:, 0, offset:offset + H * D].view(B, H, D))
        offset += H * D
    _, H0, D0, _ = pairs[0]
    sources[0] = randn(B, 1, H0 * D0 + 3, dtype=dtype, seed=seed + 11, device=device)[..., :H0 * D0]
    sources[0] = sources[0].view(B, 1, H0, D0)[:, 0]
    gen = torch.Generator().manual_seed(seed)
    slots = [torch.randint(0, S, (B,), generator=gen).to(device, torch.int64 if i % 2 else torch.int32)
             for i, (S, _, _, _) in enumerate(pairs)]
    if len(pairs) > 1:
        slots[-1] = slots[-2] = torch.randint(0, min(S for S, *_ in pairs[-2:]), (B,), generator=gen).to(device)
    return caches, dests, sources, slots


def check_cache_written(caches, before, dests, sources, slots):
    """Each dest's row b at slots[b] holds sources[b]; every other element of the caches (other slots, the padding
    columns past D) is as before."""
    for cache, old, dest, source, slot in zip(caches, before, dests, sources, slots):
        rows, slot = torch.arange(cache.shape[0], device=cache.device), slot.long()
        assert torch.equal(dest[rows, slot], source)
        restored = cache.clone()
        restored[rows, slot, :, :dest.shape[3]] = old[rows, slot, :, :dest.shape[3]]
        assert torch.equal(restored, old), "an element outside the written slots changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 3, 6])
def test_cache_write_matches_reference(dtype, count):
    caches, dests, sources, slots = cache_write_inputs(CACHE_PAIRS[count], dtype, seed=count)
    before = [cache.clone() for cache in caches]
    expected = [cache.clone() for cache in caches]
    assert not sources[0].is_contiguous()
    assert cache_write.cache_write_(dests, tuple(sources), slots) is None
    reference.cache_write_([e[..., :d.shape[3]] for e, d in zip(expected, dests)], sources, slots)
    for cache, ref in zip(caches, expected):
        assert torch.equal(cache, ref)
    check_cache_written(caches, before, dests, sources, slots)


def test_public_cache_write_on_the_cpu_runs_the_reference_which_checks_slot_values():
    caches, dests, sources, slots = cache_write_inputs(CACHE_PAIRS[3], torch.float32, B=2, device="cpu")
    before = [cache.clone() for cache in caches]
    layers.cache_write_(dests, sources, slots)
    check_cache_written(caches, before, dests, sources, slots)
    slots[1] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"^cache_write_: slots\[1\] holds values in \[0, 5\]; each must be in "
                                         r"\[0, S\) = \[0, 5\) of dests\[1\]"):
        layers.cache_write_(dests, sources, slots)
    slots[1] = torch.tensor([-1, 0])
    with pytest.raises(ValueError, match=r"slots\[1\] holds values in \[-1, 0\]"):
        layers.cache_write_(dests, sources, slots)


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------


def f32(*shape):
    return torch.zeros(shape, device=DEVICE)


def slot_ids(B):
    return torch.zeros(B, dtype=torch.int64, device=DEVICE)


BAD_INPUTS = [
    ("add_rms_norm", lambda: (f32(3, 8), f32(7), 1e-6), "weight has 7 elements but x's last dim is D=8"),
    ("add_rms_norm", lambda: (f32(3, 8), f32(8), 1e-6, f32(2, 8)), r"residual \(2, 8\) must have x's shape \(3, 8\)"),
    ("add_rms_norm", lambda: (f32(3, 8), f32(8).half(), 1e-6), "weight has dtype torch.float16 but x has torch.float32"),
    ("add_rms_norm", lambda: (f32(3, 8).double(), f32(8).double(), 1e-6), "x has dtype torch.float64; use one of"),
    ("add_rms_norm", lambda: (f32(8, 3).t(), f32(8), 1e-6), "x's last dim has stride 3; it must be contiguous"),
    ("add_rms_norm", lambda: (f32(3, 8), f32(8), -1.0), "eps must be a number >= 0"),
    ("rotary_", lambda: (f32(1, 2, 3, 5), f32(1, 2, 1, 2), f32(1, 2, 1, 2)), "x has head dim D=5; rotate-half RoPE needs an even D"),
    ("rotary_", lambda: (f32(2, 3, 8), f32(2, 3), f32(2, 3)), r"x must be 4-D \[B, T, R, D\]"),
    ("rotary_", lambda: (f32(1, 2, 3, 8), f32(1, 3, 1, 4), f32(1, 2, 1, 4)), r"cos has shape \(1, 3, 1, 4\)"),
    ("rotary_", lambda: (f32(1, 2, 3, 8), f32(1, 2, 4), f32(1, 2, 4).half()), "sin has dtype torch.float16; the RoPE"),
    ("rotary_", lambda: (f32(1, 2, 8, 3).transpose(2, 3), f32(1, 2, 4), f32(1, 2, 4)), "x's last dim has stride 3"),
    ("silu_mul", lambda: (f32(3, 9),), "gate_up's last dim 9 is odd"),
    ("silu_mul", lambda: (f32(3, 8).int(),), "gate_up has dtype torch.int32"),
    ("cache_write_", lambda: (f32(2, 4, 1, 8), [f32(2, 1, 8)], [slot_ids(2)]),
     "dests must be a list or tuple of 1 to 6 tensors, got Tensor"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)] * 2, [f32(2, 1, 8)], [slot_ids(2)] * 2),
     "got 2 dests, 1 sources and 2 slots; pass one source"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)] * 7, [f32(2, 1, 8)] * 7, [slot_ids(2)] * 7),
     "got 7 dests; one call writes 1 to 6"),
    ("cache_write_", lambda: ([], [], []), "got 0 dests; one call writes 1 to 6"),
    ("cache_write_", lambda: ([f32(2, 4, 8)], [f32(2, 1, 8)], [slot_ids(2)]), r"dests\[0\] must be 4-D \[B, S, H, D\]"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 16)[..., ::2]], [f32(2, 1, 8)], [slot_ids(2)]),
     r"dests\[0\]'s last dim has stride 2; it must be contiguous"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 16)[..., ::2]], [slot_ids(2)]),
     r"sources\[0\]'s last dim has stride 2; it must be contiguous"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 6)], [slot_ids(2)]),
     r"sources\[0\] has shape \(2, 1, 6\) but dests\[0\] \(2, 4, 1, 8\) needs \[B, H, D\] = \[2, 1, 8\]"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 8).half()], [slot_ids(2)]),
     r"sources\[0\] has dtype torch.float16 but dests\[0\] has torch.float32"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8).double()], [f32(2, 1, 8).double()], [slot_ids(2)]),
     r"dests\[0\] has dtype torch.float64; use one of"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8), f32(3, 4, 1, 8)], [f32(2, 1, 8), f32(3, 1, 8)], [slot_ids(2)] * 2),
     r"dests\[1\] has B=3 rows but dests\[0\] has 2; every pair writes the same B rows"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 8)], [f32(2)]),
     r"slots\[0\] must be an int64 or int32 tensor \[B\] = \[2\] .*, got torch.float32 \(2,\)"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 8)], [slot_ids(3)]),
     r"slots\[0\] must be an int64 or int32 tensor \[B\] = \[2\] .*, got torch.int64 \(3,\)"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 8)], [[0, 1]]), r"slots\[0\] must be .*, got list"),
    ("cache_write_", lambda: ([f32(2, 4, 1, 8)], [f32(2, 1, 8)], [slot_ids(2).to("meta")]),
     r"slots\[0\] is on meta but dests\[0\] is on .*; move it to the cache's device"),
]
MODULES = {"triton": {"add_rms_norm": norm.add_rms_norm, "rotary_": rotary.rotary_, "silu_mul": swiglu.silu_mul,
                      "cache_write_": cache_write.cache_write_},
           "reference": {"add_rms_norm": reference.add_rms_norm, "rotary_": reference.rotary_,
                         "silu_mul": reference.silu_mul, "cache_write_": reference.cache_write_}}


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("op, make_args, message", BAD_INPUTS)
def test_bad_input_raises_value_error(path, op, make_args, message):
    with pytest.raises(ValueError, match=f"^{op}: {message}"):
        MODULES[path][op](*make_args())


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("op", ["add_rms_norm", "rotary_", "silu_mul", "cache_write_"])
def test_inputs_requiring_grad_are_refused_outside_no_grad(path, op):
    args = {"add_rms_norm": (f32(3, 8), f32(8).requires_grad_(), 1e-6),
            "rotary_": (f32(1, 2, 3, 8).requires_grad_(), f32(1, 2, 4), f32(1, 2, 4)),
            "silu_mul": (f32(3, 8).requires_grad_(),),
            "cache_write_": ([f32(2, 4, 1, 8)], [f32(2, 1, 8).requires_grad_()], [slot_ids(2)])}[op]
    fn = MODULES[path][op]
    with pytest.raises(ValueError, match="requires grad, but these are inference kernels .* torch.no_grad()"):
        fn(*args)
    with torch.no_grad():
        fn(*args)


def test_triton_path_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="^silu_mul: gate_up is on cpu; the Triton path needs CUDA tensors"):
        swiglu.silu_mul(torch.zeros(3, 8))


def test_norm_refuses_rows_wider_than_the_kernel():
    with pytest.raises(ValueError, match="^add_rms_norm: x's last dim D=8200: the Triton kernel takes D <= 8192"):
        norm.add_rms_norm(f32(1, 8200), f32(8200), 1e-6)


# ----------------------------------------------------------------------------------------------------
# GPU: bfloat16 at the paper's shapes through the public functions (Triton on CUDA tensors)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu  # bfloat16 Triton kernels
@pytest.mark.parametrize("tokens", [8, 4096])
@torch.no_grad()
def test_bfloat16_paper_shapes_on_gpu(tokens):
    bf, dev, D, R, Dh, I = torch.bfloat16, "cuda", 2560, 76, 192, 6912
    x, residual = randn(tokens, D, dtype=bf, seed=1, device=dev) * 4, randn(tokens, D, dtype=bf, seed=2, device=dev)
    weight = randn(D, dtype=bf, seed=3, device=dev)
    for res in (None, residual):
        normed, summed = layers.add_rms_norm(x, weight, 1e-6, res)
        normed_ref, summed_ref = reference.add_rms_norm(x, weight, 1e-6, res)
        check_close(normed, normed_ref)
        assert torch.equal(summed, summed_ref)

    wide = randn(1, tokens, R * Dh + 64, dtype=bf, seed=4, device=dev)
    expected = wide.clone()
    cos, sin = (t.to(dev) for t in rope_tables(1, tokens, Dh, 4))
    layers.rotary_(wide[..., : R * Dh].view(1, tokens, R, Dh), cos, sin)
    reference.rotary_(expected[..., : R * Dh].view(1, tokens, R, Dh), cos, sin)
    check_close(wide[..., : R * Dh], expected[..., : R * Dh])
    assert torch.equal(wide[..., R * Dh:], expected[..., R * Dh:])

    gate_up = randn(tokens, 2 * I, dtype=bf, seed=5, device=dev) * 3
    check_close(layers.silu_mul(gate_up), reference.silu_mul(gate_up))


@pytest.mark.gpu  # CUDA-graph capture of the Triton kernel
@torch.no_grad()
def test_cache_write_replays_in_a_cuda_graph_with_new_slots_and_tokens():
    """The decode step's six writes (bfloat16, the paper's Dk = 192, Dv = 128, values padded to 192) captured once;
    each replay writes the tokens now in the sources at the slots now in the slot tensors."""
    pairs = [(64, 4, 192, 192), (64, 4, 128, 192), (32, 4, 192, 192), (32, 4, 128, 128), (16, 4, 192, 192),
             (16, 4, 128, 128)]
    caches, dests, sources, slots = cache_write_inputs(pairs, torch.bfloat16, B=8, seed=20)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layers.cache_write_(dests, sources, slots)  # compiles and loads the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers.cache_write_(dests, sources, slots)
    for step in range(1, 3):
        for slot in {id(slot): slot for slot in slots}.values():  # the last two pairs share one tensor
            slot.add_(1).remainder_(16)  # every slot moves: a replay of the captured values would miss them all
        for i, source in enumerate(sources):
            source.copy_(randn(*source.shape, dtype=torch.bfloat16, seed=100 * step + i, device="cuda"))
        before = [cache.clone() for cache in caches]
        graph.replay()
        torch.cuda.synchronize()
        check_cache_written(caches, before, dests, sources, slots)
