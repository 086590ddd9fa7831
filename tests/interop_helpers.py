"""Helpers shared by the interop tests: a local lm-eval task folder, our server on loopback, flash-linear-attention's
NSA model on the CPU."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# serve_forever's default poll of 0.5 s is how long shutdown() can wait for the loop to notice: half a second per
# server a test starts and stops
POLL_S = 0.05

# Eight arithmetic questions with four choices each; `answer` indexes the correct one.
TOY_ROWS = [
    {"question": f"What is {a} plus {b}?", "choices": [str(a + b + d) for d in shift], "answer": shift.index(0),
     "target": str(a + b)}
    for (a, b), shift in zip(
        [(1, 2), (2, 3), (4, 5), (7, 1), (3, 3), (6, 2), (5, 5), (8, 1)],
        [(0, 1, 2, 3), (1, 0, 2, 3), (2, 1, 0, 3), (3, 2, 1, 0), (0, 2, 1, 3), (1, 3, 0, 2), (2, 0, 3, 1), (3, 1, 2, 0)],
    )
]

TOY_MC = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
num_fewshot: 1
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

TOY_GEN = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def write_lm_eval_tasks(folder: Path) -> Path:
    """toy_mc (multiple choice, 1-shot, acc and acc_norm) and toy_gen (greedy generation, regex filter,
    exact_match) as lm-eval YAML files over a local jsonl file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TOY_ROWS))
    (folder / "toy_mc.yaml").write_text(TOY_MC.format(data=data))
    (folder / "toy_gen.yaml").write_text(TOY_GEN.format(data=data))
    return folder


@contextmanager
def serving(model, served_name: str = "tiny", **options) -> Iterator:
    """Our OpenAI-compatible server for `model` on 127.0.0.1 (a free port), in a thread, for the `with` block."""
    from nsa_eval.serve import OpenAIServer

    server = OpenAIServer(model, served_name, "127.0.0.1", 0, quiet=True, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ---- flash-linear-attention's NSA model on the CPU: its attention op (fla.layers.nsa.parallel_nsa, Triton kernels
# autotuned on a GPU) swapped for fla's own PyTorch reference pieces; its autotuned helper kernels (rotary) pinned to
# their first config so they run in Triton's interpreter


def fla_nsa_on_cpu(q, k, v, g_cmp=None, g_slc=None, g_swa=None, block_indices=None, block_counts=16, block_size=64,
                   window_size=0, scale=None, cu_seqlens=None, selections=None):
    """fla.ops.nsa.naive.naive_nsa line for line (mean pooling, naive_nsa_compression, naive_nsa_topk,
    naive_nsa_selection, the gated sum) with two changes that leave its arithmetic alone: no assert that a GQA group
    is a power of 2 >= 16 (a tile size of fla's Triton kernels; the naive pieces take any group), and the window
    branch as flash_attn_func(q, k, v, causal=True, window_size=(window_size - 1, 0)) computes it (flash-attn is not
    installed here): query t sees keys t - window_size < s <= t. No cu_seqlens (the tests run batches). selections: a
    list that gets each call's selected block indices [B, T, H, n] (-1: none)."""
    import torch
    from einops import repeat
    from fla.ops.nsa.naive import naive_nsa_compression, naive_nsa_selection, naive_nsa_topk
    from fla.ops.utils.pooling import mean_pooling

    assert block_counts is not None and cu_seqlens is None and block_indices is None
    if scale is None:
        scale = k.shape[-1] ** -0.5
    k_cmp, v_cmp = mean_pooling(k, block_size, None), mean_pooling(v, block_size, None)
    o_cmp, _ = naive_nsa_compression(q=q, k_cmp=k_cmp, v_cmp=v_cmp, block_size=block_size, scale=scale)
    block_indices = naive_nsa_topk(q=q, k_cmp=k_cmp, block_counts=block_counts, block_size=block_size, scale=scale)
    if selections is not None:
        selections.append(block_indices)
    o = o_slc = naive_nsa_selection(q, k, v, block_indices, block_size, scale)
    if g_slc is not None:
        o = o_slc * g_slc.unsqueeze(-1)
    o = torch.addcmul(o, o_cmp, g_cmp.unsqueeze(-1))
    if window_size > 0:
        group = q.shape[2] // k.shape[2]
        kw, vw = (repeat(x, "b t h d -> b (h g) t d", g=group) for x in (k, v))
        t = torch.arange(q.shape[1])
        visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window_size)
        o_swa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kw, vw, attn_mask=visible,
                                                                 scale=scale).transpose(1, 2)
        o = torch.addcmul(o, o_swa.to(o.dtype), g_swa.unsqueeze(-1))
    return o


def run_fla_on_cpu(monkeypatch) -> list:
    """Patch fla for the CPU (as the comment above says) for the rest of the test; returns the list that collects
    each attention call's selected block indices."""
    from functools import partial

    from triton.runtime.autotuner import Autotuner

    import fla.layers.nsa as fla_layer

    selections: list = []
    monkeypatch.setattr(fla_layer, "parallel_nsa", partial(fla_nsa_on_cpu, selections=selections))
    monkeypatch.setattr(Autotuner, "prune_configs", lambda self, kwargs, *args: self.configs[:1])
    return selections
