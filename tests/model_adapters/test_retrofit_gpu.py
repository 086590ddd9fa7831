"""The retrofit's training step on our Triton kernels (CUDA) equals the PyTorch reference's (CPU): loss and the
gradients of every trained tensor, on a short sequence (model_adapters/retrofit.py)."""

import numpy as np
import pytest
import torch

from nsa_eval.model_adapters.retrofit import Recipe, batch_at, distill_kl, student_from_base
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer

pytestmark = pytest.mark.gpu


def step_grads(device: str, window: int):
    """Loss and gradients of one retrofit step (stage 2: every trained tensor) on `device`, float32."""
    config = ModelConfig(vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=32, v_head_dim=32, intermediate_size=192,
                         max_position_embeddings=1024, attention="full", tie_word_embeddings=True)
    base = Transformer(config).init_weights(std=0.2, seed=1).to(device)
    recipe = Recipe(base="tiny", block=16, selected=4, window=window, lora_rank=4, seq_len=384, warmup_steps=0,
                    steps=1, probes=64)
    student = student_from_base(base, recipe)
    with torch.no_grad():  # nonzero low-rank updates and gates, so every path carries gradient
        g = torch.Generator().manual_seed(2)
        for p in student.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids, probes = batch_at(np.random.default_rng(0).integers(0, 256, 5000), recipe, 0)
    ids, probes = ids.to(device), probes.to(device)
    with torch.no_grad():
        teacher, _ = student(ids, student=False)
    logits, mass = student(ids, student=True, probes=probes)
    loss = distill_kl(logits, teacher) + mass
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}
    return loss.item(), mass.item(), grads


@pytest.mark.parametrize("window", [0, 64])
def test_retrofit_step_on_triton_equals_the_reference(window):
    torch.backends.cuda.matmul.allow_tf32 = False
    loss_gpu, mass_gpu, grads_gpu = step_grads("cuda", window)
    loss_cpu, mass_cpu, grads_cpu = step_grads("cpu", window)
    assert abs(loss_gpu - loss_cpu) <= 2e-3 * abs(loss_cpu) and abs(mass_gpu - mass_cpu) <= 2e-3 * abs(mass_cpu)
    assert set(grads_gpu) == set(grads_cpu) and len(grads_cpu) == 2 * (1 + 4 * 2)
    for name, ref in grads_cpu.items():
        err = ((grads_gpu[name] - ref).norm() / ref.norm()).item()
        assert ref.norm() > 0 and err < 1e-2, (name, err)
