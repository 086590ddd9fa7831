"""Where the whole model's time goes on a GPU: every CUDA kernel of a decode step and of a prefill of the paper-shape
NSA model (and of its full-attention twin), from torch.profiler, in microseconds per layer. Complements
`nsa-eval bench model` (end-to-end times) and scripts/nsa_breakdown.py (the NSA kernels alone).

    python scripts/model_profile.py --T 65536 --batch 8 --layers 2 --out results/bench/model-profile.json

Decode runs eagerly here (kernel durations do not depend on how they are launched; the CUDA-graph replay of
`bench model` removes the host's launch time, not the kernels'). The cache is filled with random keys and values
instead of a prefill, so the step's reads are those of a T-token context.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from nsa_eval.bench.model import PAPER_SHAPE, make_model


def kernel_table(prof, per: float) -> list[dict]:
    """CUDA kernels of a profile -> [{kernel, calls, us}] (us: total device time / per), longest first."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us <= 0:
            continue
        rows.append({"kernel": event.key[:90], "calls": event.count / per, "us": device_us / per})
    return sorted(rows, key=lambda r: -r["us"])


def filled_cache(model, batch: int, T: int):
    """A cache of `batch` rows holding T random tokens each (every tensor random, lengths T)."""
    cache = model.new_cache(batch, T + 64)
    for layer in cache.layers:
        for tensor in layer.values():
            tensor.normal_()
    cache.lengths.fill_(T)
    cache.host_lengths = [T] * batch
    return cache


def profile_decode(model, batch: int, T: int, steps: int) -> list[dict]:
    model.cuda_graphs = False
    cache = filled_cache(model, batch, T)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    for _ in range(4):
        model(ids, past_key_values=cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model(ids, past_key_values=cache)
        torch.cuda.synchronize()
    return kernel_table(prof, steps * model.config.num_hidden_layers)


def profile_prefill(model, T: int) -> list[dict]:
    model.prefill_chunk = 0
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    model(ids, logits_to_keep=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
    return kernel_table(prof, model.config.num_hidden_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (16: one makes a block)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="model-profile.json")
    a = parser.parse_args()
    fields = {**PAPER_SHAPE, "num_hidden_layers": a.layers}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "T": a.T, "batch": a.batch,
              "layers": a.layers, "unit": "us per layer (decode: per layer and step)"}
    for name, attention, backend in (("nsa", "nsa", None), ("full sdpa cudnn", "full", "cudnn")):
        model = make_model(fields, attention, backend)
        for stage, rows in (("decode", lambda: profile_decode(model, a.batch, a.T, a.steps)),
                            ("prefill", lambda: profile_prefill(model, a.T))):
            table = rows()
            result[f"{name} {stage}"] = table
            total = sum(r["us"] for r in table)
            print(f"\n{name} {stage} (T={a.T}{f', batch {a.batch}' if stage == 'decode' else ''}): "
                  f"{total:.1f} us of kernels per layer{' and step' if stage == 'decode' else ''}, "
                  f"{sum(r['calls'] for r in table):.1f} kernels")
            for r in table[:a.top]:
                print(f"  {r['us']:9.1f} us {r['calls']:5.2f}x  {r['kernel']}")
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
