"""The runtime's KV cache: a fixed number of slots (rows), each one sequence of up to `capacity` tokens, allocated
once per run and reused as requests come and go (a finished row's slot takes the next request).

Per layer, a dict of tensors [slots, ..., H, D]:
- "k", "v": the raw keys/values of every token (`capacity` positions; the selection branch's, and the window's when
  K/V are shared). Values may be stored zero-padded to a wider head dim (SDPA backends that need Dv == Dk).
- NSA and sparse attention add "k_cmp", "v_cmp" (compressed blocks: num_compressed_blocks(capacity) of them) and
  "k_ring", "v_ring" (the compression branch's last block_len raw keys/values, token p in slot p % block_len).
- NSA with independent K/V and a window adds "k_win", "v_win" (the window branch's ring, token p in slot p % w).
lengths [slots] int32 and active [slots] int32 live on the device (the kernels and CUDA graphs read them); a decode
step advances the length of active rows only, and a free row keeps length >= 1 so that every kernel has a key to read.
"""

from __future__ import annotations

import torch

from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.graphs import DecodeGraphs

SEQUENCE_KEYS = ("k", "v")  # grow with the capacity
BLOCK_KEYS = ("k_cmp", "v_cmp")  # grow with num_compressed_blocks(capacity)


class SlotCache:
    """The cache of `slots` sequences (module docstring). host_lengths / host_active: lengths and active flags on the
    host, kept in step by the model (prefill sets a row's, a decode step adds 1 to every active row's)."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], capacity: int):
        self.layers = layers
        slots = layers[0]["k"].shape[0]
        device = layers[0]["k"].device
        self.lengths = torch.ones(slots, dtype=torch.int32, device=device)
        self.active = torch.ones(slots, dtype=torch.int32, device=device)
        self.host_lengths = [0] * slots
        self.host_active = [True] * slots
        self.capacity = capacity
        # each row's next input token; a decode step reads ids[:rows] and (with a head) writes its tokens back
        self.ids = torch.zeros(slots, dtype=torch.long, device=device)
        self.graphs = DecodeGraphs()  # the decode step's CUDA graphs over these tensors, per (rows, compress, head)

    @property
    def slots(self) -> int:
        return len(self.host_lengths)

    def rows(self, n: int) -> list[dict[str, torch.Tensor]]:
        """Every layer's tensors restricted to rows [0, n) (views: the decode step of a batch of n)."""
        if n == self.slots:
            return self.layers
        return [{key: t[:n] for key, t in layer.items()} for layer in self.layers]

    def copy_slot(self, source: int, target: int) -> None:
        """Slot `target` becomes a copy of slot `source` (n samples of one prompt share its prefill)."""
        n = self.host_lengths[source]
        for layer in self.layers:
            for key, t in layer.items():
                if key in SEQUENCE_KEYS:
                    t[target, :n] = t[source, :n]
                else:
                    t[target] = t[source]
        self.lengths[target] = self.lengths[source]
        self.host_lengths[target] = n

    def set_active(self, rows: list[int], active: bool) -> None:
        """Mark rows as decoding (their length advances each step) or free."""
        self.active[rows] = int(active)
        for r in rows:
            self.host_active[r] = active

    def drop_graphs(self) -> None:
        """Forget the captured decode steps (after the tensors they read were replaced)."""
        self.graphs = DecodeGraphs()


def new_cache(config: ModelConfig, slots: int, capacity: int, device: torch.device, dtype: torch.dtype,
              value_width: int | None = None) -> SlotCache:
    """An empty cache of `slots` rows of up to `capacity` tokens (value_width: Dv stored, default the model's)."""
    c = config
    capacity = max(capacity, c.block_len)
    kw = dict(device=device, dtype=dtype)
    H, dk, dv = c.num_key_value_heads, c.head_dim, c.v_head_dim
    layers = []
    for _ in range(c.num_hidden_layers):
        layer = {"k": torch.zeros(slots, capacity, H, dk, **kw),
                 "v": torch.zeros(slots, capacity, H, value_width or dv, **kw)}
        if c.compressed:
            blocks = (capacity - c.block_len) // c.block_stride + 1
            layer.update(k_cmp=torch.zeros(slots, blocks, H, dk, **kw), v_cmp=torch.zeros(slots, blocks, H, dv, **kw),
                         k_ring=torch.zeros(slots, c.block_len, H, dk, **kw),
                         v_ring=torch.zeros(slots, c.block_len, H, dv, **kw))
            if c.window and not c.shared_kv:
                layer.update(k_win=torch.zeros(slots, c.window, H, dk, **kw),
                             v_win=torch.zeros(slots, c.window, H, dv, **kw))
        layers.append(layer)
    return SlotCache(layers, capacity)


def grow_cache(config: ModelConfig, cache: SlotCache, capacity: int) -> None:
    """Make room for `capacity` tokens per row, keeping what is cached (a new allocation drops the CUDA graphs)."""
    if capacity <= cache.capacity:
        return
    c = config
    blocks = (capacity - c.block_len) // c.block_stride + 1
    for layer in cache.layers:
        for key, size in [(k, capacity) for k in SEQUENCE_KEYS] + [(k, blocks) for k in BLOCK_KEYS if k in layer]:
            old = layer[key]
            layer[key] = old.new_zeros(old.shape[0], size, *old.shape[2:])
            layer[key][:, :old.shape[1]] = old
    cache.capacity = capacity
    cache.drop_graphs()
