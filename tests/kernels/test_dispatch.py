"""The one dispatch rule of nsa_eval.kernels (kernels/utils.py: by_device): Triton on CUDA tensors, the reference
elsewhere, with the reference's name, signature and docstring."""

import inspect
from types import SimpleNamespace

import torch

import nsa_eval.kernels.attention as attention_op
from nsa_eval.kernels import layers, nsa
from nsa_eval.kernels.attention import reference as attention_ref
from nsa_eval.kernels.layers import reference as layers_ref
from nsa_eval.kernels.nsa import reference as nsa_ref
from nsa_eval.kernels.utils import by_device, on_cuda

CUDA_LIKE = SimpleNamespace(is_cuda=True)


def test_by_device_picks_by_the_first_argument():
    def reference_fn(x, y=1, *, z=2):
        """spec"""
        return "reference", x, y, z

    public = by_device(lambda *a, **k: ("triton", *a, *k.values()), reference_fn)
    cpu = torch.zeros(1)
    assert public(cpu)[0] == "reference" and public(x=cpu, z=3)[3] == 3
    assert public(CUDA_LIKE, 5)[0] == "triton" and public(x=CUDA_LIKE)[0] == "triton"
    assert public([CUDA_LIKE])[0] == "triton" and public([])[0] == "reference"  # a list goes by its first item
    assert on_cuda((cpu,)) is False and on_cuda(None) is False
    assert inspect.signature(public) == inspect.signature(reference_fn) and public.__doc__ == "spec"


def test_public_functions_carry_the_reference_signatures():
    pairs = [(attention_op.attention, attention_ref.attention), (attention_op.attention_decode, attention_ref.attention_decode),
             (nsa.nsa_attention, nsa_ref.nsa_attention), (nsa.nsa_decode, nsa_ref.nsa_decode), (nsa.gated_sum, nsa_ref.gated_sum),
             (layers.add_rms_norm, layers_ref.add_rms_norm), (layers.rotary_, layers_ref.rotary_),
             (layers.silu_mul, layers_ref.silu_mul), (layers.cache_write_, layers_ref.cache_write_)]
    for public, reference in pairs:
        assert inspect.signature(public) == inspect.signature(reference), public.__name__


def test_cpu_tensors_run_the_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, 4, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    torch.testing.assert_close(attention_op.attention(q, k, v, causal=True), attention_ref.attention(q, k, v, causal=True))
    x = torch.randn(3, 8)
    torch.testing.assert_close(layers.silu_mul(x), layers_ref.silu_mul(x))
