"""What one decode step reads from the KV cache, and how much of the context it attends, from a model's attention kind
and settings: the cost fields every generative sample records (issue 21). The numbers are the attention
algorithm's, computed from the config, not measured.

Counted per decode step (one generated token of one sequence; its context t: the cached tokens, the new one included),
summed over every layer and KV head, in elements of the cache's dtype:
- full attention: the key and the value of every cached token, or of the last `sliding_window` tokens;
- NSA (eq. 5-12): the compressed key and value of every complete compression block (block i once i*d + l <= t),
  the raw keys and values of the selected blocks (n blocks of l' tokens, the newest block only up to the new token;
  every token while the context holds at most n blocks) and of the window's last w tokens. Each branch is counted on
  its own: a token in a selected block and in the window is read by both (as the kernels read it, Figure 3);
- training-free sparse (`--attention sparse`): the block-mean key of every complete block (what the selection scores)
  and the raw keys and values of its `budget // block` blocks (leading, local and selected), every token while the
  context holds at most that many blocks.
Bytes = elements x the dtype's bytes; an element count is tokens x KV heads x (key dim + value dim) per layer (block
means: key dim only). Not counted: queries, weights, activations, the selection's scratch (scores, top-n lists), and
what an implementation reads beyond the algorithm: the native engine decodes sparse attention with NSA's kernel and
its compressed branch gated off, so the kernel also reads the block means' values; the transformers engine's sparse
attention recomputes the block means from every cached key at each step.

Share of the context attended: the distinct context tokens whose keys enter a softmax, over t. Full attention: 1.0
(min(w, t) / t with a sliding window). Sparse: its blocks' tokens over t, which is budget / t when t exceeds the budget
and ends on a block boundary. NSA: the selected and the window tokens, with the two forced local blocks (the new
token's and the one before, inside the window) counted once but no other overlap, since which blocks the selection
took is not recorded: an upper bound. Compressed blocks summarise tokens and do not count as attending them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nsa_eval.kernels.nsa.layout import NSALayout

ATTENTION_KINDS = ("full", "nsa", "sparse")


@dataclass(frozen=True)
class StepCost:
    """A sample's decode steps: how many, their KV bytes and their shares of the context attended, summed."""

    steps: int = 0
    kv_bytes: float = 0.0
    attended_share: float = 0.0

    def __add__(self, other: "StepCost") -> "StepCost":
        return StepCost(self.steps + other.steps, self.kv_bytes + other.kv_bytes,
                        self.attended_share + other.attended_share)

    @property
    def kv_bytes_per_step(self) -> float | None:
        return self.kv_bytes / self.steps if self.steps else None

    @property
    def mean_attended_share(self) -> float | None:
        return self.attended_share / self.steps if self.steps else None


@dataclass(frozen=True)
class DecodeCost:
    """The KV reads and the share attended of one decode step at a context of t tokens (module docstring).

    attention: full | nsa | sparse; layers, kv_heads, key_dim, value_dim: the cache's shape; dtype_bytes: bytes per
    element of the cache; sliding_window: full attention's window (None: none). NSA and sparse: their layout (the
    kernels' NSALayout: l, d, l', n, w; sparse: l = d = l' = its block, n = budget // block, w 0); None for full.
    """

    attention: str
    layers: int
    kv_heads: int
    key_dim: int
    value_dim: int
    dtype_bytes: int
    sliding_window: int | None = None
    layout: NSALayout | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if (self.layout is None) != (self.attention == "full"):
            kind = "no layout" if self.attention == "full" else "an NSA layout"
            raise ValueError(f"attention {self.attention} takes {kind}")

    @classmethod
    def of_config(cls, config: Any, dtype_bytes: int) -> "DecodeCost":
        """From the runtime's ModelConfig (runtime/config.py; for sparse its block fields are already derived)."""
        full = config.attention == "full"
        return cls(config.attention, config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                   config.v_head_dim, dtype_bytes, config.sliding_window if full else None,
                   None if full else config.layout)

    @classmethod
    def of_transformers(cls, config: Any, dtype_bytes: int, sparse: Any = None) -> "DecodeCost | None":
        """From a transformers config (HFModel), full attention or `sparse` (SparseSettings); None where the cache is
        not one K/V per layer of the same kind (latent attention's kv_lora_rank; layers of mixed types)."""
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if getattr(config, "kv_lora_rank", None) or len(kinds) > 1 or not kinds <= {"full_attention",
                                                                                    "sliding_attention"}:
            return None
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if kinds == {"sliding_attention"} and not window:
            return None
        if sparse is not None:
            return cls("sparse", config.num_hidden_layers, kv_heads, head_dim, head_dim, dtype_bytes,
                       layout=sparse.layout)
        return cls("full", config.num_hidden_layers, kv_heads, head_dim, head_dim, dtype_bytes, window or None)

    # ---- per step, at context t (an int or an array of them) --------------------------------------------------

    def _selected_tokens(self, t):
        """Raw tokens of the selected blocks: all of them up to n blocks, else n - 1 whole blocks and the newest's."""
        layout = self.layout
        blocks = -(-t // layout.select_len)
        newest = t - (blocks - 1) * layout.select_len
        return np.where(blocks <= layout.num_selected, t, (layout.num_selected - 1) * layout.select_len + newest)

    def _compressed_blocks(self, t):
        l, d = self.layout.block_len, self.layout.block_stride
        return np.where(t >= l, (t - l) // d + 1, 0)

    def token_reads(self, t) -> tuple[Any, Any]:
        """(raw tokens whose key and value a step reads, compressed blocks whose key (NSA: and value) it reads)."""
        t = np.asarray(t, dtype=np.int64)
        if self.attention == "full":
            return (np.minimum(t, self.sliding_window) if self.sliding_window else t), np.zeros_like(t)
        raw = self._selected_tokens(t)
        if self.attention == "nsa" and self.layout.window:
            raw = raw + np.minimum(t, self.layout.window)
        return raw, self._compressed_blocks(t)

    def kv_bytes(self, t):
        """KV cache bytes one decode step reads at context t (module docstring says what is counted)."""
        raw, compressed = self.token_reads(t)
        compressed_width = self.key_dim + (self.value_dim if self.attention == "nsa" else 0)
        per_head = raw * (self.key_dim + self.value_dim) + compressed * compressed_width
        return per_head * self.kv_heads * self.layers * self.dtype_bytes

    def attended(self, t):
        """Distinct context tokens a step attends at context t (NSA: an upper bound, module docstring)."""
        t = np.asarray(t, dtype=np.int64)
        if self.attention == "full":
            return np.minimum(t, self.sliding_window) if self.sliding_window else t
        selected = self._selected_tokens(t)
        window, select_len = self.layout.window, self.layout.select_len
        if self.attention == "sparse" or not window:
            return selected
        blocks = -(-t // select_len)
        local = np.minimum(selected, t - np.maximum(blocks - 2, 0) * select_len)  # the newest two blocks' tokens
        return np.minimum(t, selected + np.minimum(t, window) - np.minimum(local, window))

    def over_steps(self, prompt_tokens: int, steps: int) -> StepCost:
        """The decode steps of one sample: step j (1-based) reads a context of prompt_tokens + j tokens (the first new
        token comes from the prefill; each step writes the previous token and samples the next)."""
        if steps <= 0:
            return StepCost()
        t = np.arange(prompt_tokens + 1, prompt_tokens + steps + 1, dtype=np.int64)
        return StepCost(steps, float(self.kv_bytes(t).sum()), float((self.attended(t) / t).sum()))
