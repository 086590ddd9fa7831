"""Seconds per retrofit step (stage 2: distillation + block-mass KL, backward, AdamW) for a SmolLM2-135M-shaped
model with random weights on CUDA, at the given sequence lengths; prints a table. Used to size `nsa-eval retrofit
--steps` to a GPU budget.   python scripts/retrofit_timing.py --seq-lens 2048,4096,8192"""

import argparse
import time

import numpy as np
import torch

from nsa_eval.model_adapters.retrofit import Recipe, batch_at, distill_kl, optimizer_for, student_from_base
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, v_head_dim=64, intermediate_size=1536, max_position_embeddings=8192, attention="full",
               rope_theta=100000.0, tie_word_embeddings=True)

parser = argparse.ArgumentParser()
parser.add_argument("--seq-lens", default="2048,4096,8192")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()
base = Transformer(ModelConfig(**SMOLLM2)).init_weights(seed=0).to("cuda", torch.bfloat16)
corpus = np.random.default_rng(0).integers(0, 49152, 200_000)
print(f"{torch.cuda.get_device_name()}\n| seq_len | s/step (after the first) | tokens/s | peak GiB | first step s |")
print("|---|---|---|---|---|")
for seq_len in [int(x) for x in args.seq_lens.split(",")]:
    recipe = Recipe(seq_len=seq_len, warmup_steps=0, steps=args.steps)
    student = student_from_base(base, recipe)
    optimizer = optimizer_for(student, 2)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        ids, probes = batch_at(corpus, recipe, step)
        ids, probes = ids.cuda(), probes.cuda()
        with torch.no_grad():
            teacher, _ = student(ids, student=False)
        logits, mass = student(ids, student=True, probes=probes)
        (distill_kl(logits, teacher) + mass).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per = float(np.median(times[1:]))
    print(f"| {seq_len} | {per:.3f} | {seq_len / per:,.0f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} | "
          f"{times[0]:.1f} |", flush=True)
