"""Triton split-K decode step against the reference and against the last row of a full forward.

Every kernel output buffer (partials included) starts as NaN, so an element a kernel fails to write
shows up. Interpreter mode on the CPU (tests/conftest.py); bfloat16 only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from nsa_eval.kernels.attention import decode, parallel, reference
from kernel_checks import rel_err

pytestmark = pytest.mark.usefixtures("nan_outputs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_cache(B, S_max, HQ, H, Dk, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Dk, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(B, S_max, H, Dk, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(B, S_max, H, Dv, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "HQ, H, Dk, Dv, window",
    [pytest.param(4, 4, 64, 64, None, marks=pytest.mark.slow),
     pytest.param(8, 2, 128, 128, None, marks=pytest.mark.slow),
     (16, 1, 64, 64, 20), (4, 1, 192, 128, None)],
)
def test_decode_matches_reference_with_mixed_cache_lengths(HQ, H, Dk, Dv, window, dtype):
    lengths = torch.tensor([1, 37, 150], dtype=torch.int32, device=DEVICE)
    q, k_cache, v_cache = make_cache(3, 150, HQ, H, Dk, Dv, dtype)
    o, lse = decode.attention_decode(q, k_cache, v_cache, lengths, window=window, return_lse=True)
    o_ref, lse_ref = reference.attention_decode(
        q.double(), k_cache.double(), v_cache.double(), lengths, window=window, return_lse=True
    )
    assert o.shape == (3, HQ, Dv) and o.dtype == dtype
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert rel_err(o, o_ref) < BOUNDS[dtype]
    assert rel_err(lse, lse_ref) < 1e-5


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.slow
def test_decode_equals_last_row_of_full_forward(window):
    """The decode step of each sequence equals the last query row of a full causal forward over it."""
    HQ, H, D = 8, 2, 64
    lengths = [70, 1, 129]
    q, k_cache, v_cache = make_cache(3, 140, HQ, H, D, D, torch.float32, seed=1)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    o = decode.attention_decode(q, k_cache, v_cache, cache_seqlens, window=window)
    gen = torch.Generator().manual_seed(2)
    for b, length in enumerate(lengths):
        earlier_queries = torch.randn(1, length - 1, HQ, D, generator=gen).to(DEVICE)
        queries = torch.cat([earlier_queries, q[b : b + 1, None]], dim=1)
        full = parallel.attention(queries, k_cache[b : b + 1, :length], v_cache[b : b + 1, :length], window=window)
        assert rel_err(o[b], full[0, -1]) < 1e-5


def test_decode_split_count_does_not_change_the_result():
    lengths = torch.tensor([90, 200], dtype=torch.int32, device=DEVICE)
    q, k_cache, v_cache = make_cache(2, 200, 4, 2, 64, 64, torch.float32, seed=4)
    outs = [
        decode.attention_decode_fwd(q, k_cache, v_cache, lengths, None, 0.125, num_splits=n)[0] for n in (1, 3, 7)
    ]
    assert rel_err(outs[1], outs[0]) < 1e-6 and rel_err(outs[2], outs[0]) < 1e-6


BAD_INPUTS = [
    (dict(q=(2, 1, 4, 64)), {}, "q must be 3-D"),
    (dict(q=(2, 3, 64)), {}, "not a multiple of the H=2"),
    (dict(k=(2, 32, 2, 32)), {}, "k_cache head dim 32"),
    (dict(v=(2, 31, 2, 64)), {}, "must agree on"),
    (dict(q=(3, 4, 64)), {}, "q has B=3 sequences"),
    ({}, dict(lengths=torch.tensor([5, 6])), "cache_seqlens must be an int32 tensor"),
    ({}, dict(window=-3), "window must be None or a positive int"),
]


@pytest.mark.parametrize("impl", [reference.attention_decode, decode.attention_decode], ids=["reference", "triton"])
@pytest.mark.parametrize("shapes, options, message", BAD_INPUTS)
def test_decode_bad_input_raises_value_error_naming_the_argument(impl, shapes, options, message):
    q = torch.randn(shapes.get("q", (2, 4, 64)))
    k_cache = torch.randn(shapes.get("k", (2, 32, 2, 64)))
    v_cache = torch.randn(shapes.get("v", (2, 32, 2, 64)))
    options = dict(options)
    lengths = options.pop("lengths", torch.tensor([5, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match=message):
        impl(q, k_cache, v_cache, lengths, **options)


def test_reference_decode_rejects_lengths_outside_the_cache():
    q = torch.randn(2, 4, 64)
    k_cache = torch.randn(2, 32, 2, 64)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[1, S_max=32\]"):
        reference.attention_decode(q, k_cache, k_cache, torch.tensor([0, 33], dtype=torch.int32))
