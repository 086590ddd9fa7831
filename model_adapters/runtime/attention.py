"""Attention of one layer on the runtime's slot cache: prefill of a prompt slice into one slot, and a decode step of
one new token for every slot of a batch, per attention kind (full, nsa, sparse; runtime/config.py).

NSA (section 3 of the paper), per layer, for queries q and the keys/values of three branches:
    o = g_cmp * Attn(q, phi(K_cmp)) + g_slc * Attn(q, K_slc[selected blocks]) + g_win * Attn(q, K_win[last w])
- K/V per branch: independent projections (the paper; `shared_kv: false`) or one shared K/V for every branch
  (flash-linear-attention; `shared_kv: true`).
- phi (`compression`): "mlp", a learnable MLP over the l keys of a block plus an intra-block position embedding,
  shared by the KV heads; or "mean", mean pooling. Blocks of length `block_len` every `block_stride` tokens, over
  the rotated keys.
- gates: sigmoid of one linear layer of the hidden state, 3 per query head (g_proj, [HQ, 3] interleaved).
Training-free sparse attention ("sparse") is NSA's selection branch alone over a full-attention checkpoint's one
K/V: block means (l = d = l' = block) score the blocks, the leading and local tokens are always kept, one softmax
over the kept tokens (model_adapters/hf_attention.py states the rule).

Packed prefill (`prefill_packed`, a `Pack`): whole prompts packed along T (B == 1, no padding), each at its own
positions from 0, into its own slot (or none, for scoring). Full attention and NSA's branches run once over the pack
on the kernels' `cu_seqlens`; sparse attention ranks blocks sequence by sequence and attends them in one call
(runtime/sparse.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nsa_eval.kernels.nsa.utils import num_compressed_blocks
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.ops import Kernels, RMSNorm, fused_linear, rms_norm, sdpa, sdpa_value_width


class BlockCompression(nn.Module):
    """phi of the paper (eq. 7): the l keys (or values) of a block plus a learned intra-block position
    embedding, flattened, through a two-layer MLP -> one key; shared by the KV heads."""

    def __init__(self, block_len: int, dim: int, hidden: int):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(block_len, dim))
        self.fc1 = nn.Linear(block_len * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [B, N, l, H, D] -> [B, N, H, D]."""
        B, N, l, H, D = blocks.shape
        x = (blocks + self.position[:, None, :]).permute(0, 1, 3, 2, 4).reshape(B, N, H, l * D)
        return self.fc2(F.silu(self.fc1(x)))



class Attention(nn.Module):
    """The attention of one layer (full, nsa or sparse); see the module docstring. `skip_attention`, off unless a
    caller sets it: the attention itself returns zeros (projections, cache writes and the rest still run), which is
    how `nsa-eval bench model` measures the share of time in attention; a decode graph captured with it set skips
    attention when replayed, so drop the graphs after switching it. `observe`, None unless a caller sets it
    (runtime/fidelity.py: `nsa-eval inspect`): during a prefill of attention 'nsa' or 'sparse', called once per slice
    with (q [B, T, HQ, Dk] after RoPE, the selection keys of every token so far [B, S, H, Dk], the block indices
    [B, T, H, n] the selection chose for these queries), the very tensors the branches then attend with."""

    skip_attention: bool = False
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.layout = c.layout  # the NSA kernels' hyperparameters (NSALayout)
        self.hq, self.h, self.dk, self.dv = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.v_head_dim
        bias = c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, self.hq * self.dk, bias=bias)
        self.branches = ("slc",) if c.attention == "full" else ("cmp", "slc", "win") if c.window else ("cmp", "slc")
        if c.attention != "nsa" or c.shared_kv:
            self.k_proj = nn.Linear(c.hidden_size, self.h * self.dk, bias=bias)
            self.v_proj = nn.Linear(c.hidden_size, self.h * self.dv, bias=bias)
        else:
            for branch in self.branches:
                setattr(self, f"k_{branch}_proj", nn.Linear(c.hidden_size, self.h * self.dk, bias=bias))
                setattr(self, f"v_{branch}_proj", nn.Linear(c.hidden_size, self.h * self.dv, bias=bias))
        if c.attention == "nsa":
            self.g_proj = nn.Linear(c.hidden_size, self.hq * 3, bias=False)
            if c.compression == "mlp":
                self.k_compress = BlockCompression(c.block_len, self.dk, c.compress_hidden_size)
                self.v_compress = BlockCompression(c.block_len, self.dv, c.compress_hidden_size)
        if c.qk_norm:  # Qwen3: RMSNorm over each query and key head, before RoPE
            self.q_norm = RMSNorm(self.dk, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.dk, c.rms_norm_eps)
        self.o_proj = nn.Linear(self.hq * self.dv, c.hidden_size, bias=c.o_bias)

    # ---- projections ---------------------------------------------------------------------------------------

    def kv_sources(self) -> dict[str, int]:
        """branch -> index of its (k, v) pair among project()'s outputs: one pair when K/V are shared."""
        if self.config.attention != "nsa" or self.config.shared_kv:
            return {branch: 0 for branch in self.branches}
        return {branch: i for i, branch in enumerate(self.branches)}

    def input_projections(self) -> list[nn.Linear]:
        """The Linear layers of the attention's input, in the column order of project()'s one GEMM: q, every
        distinct key projection, every value projection, then the NSA gates."""
        if self.config.attention != "nsa" or self.config.shared_kv:
            keys, values = [self.k_proj], [self.v_proj]
        else:
            keys = [getattr(self, f"k_{b}_proj") for b in self.branches]
            values = [getattr(self, f"v_{b}_proj") for b in self.branches]
        return [self.q_proj, *keys, *values] + ([self.g_proj] if self.config.attention == "nsa" else [])

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: "Kernels") -> tuple[torch.Tensor, ...]:
        """x [B, T, hidden] -> (q, k_0, v_0, k_1, v_1, ..., gates): q [B, T, HQ, Dk] and keys [B, T, H, Dk] rotated,
        values [B, T, H, Dv], one pair per distinct K/V source (kv_sources), NSA gates [B, T, HQ, 3] last. One GEMM
        (fused_linear) and one RoPE call over q and every key; q, keys and values are views of its output."""
        B, T, _ = x.shape
        out = F.linear(x, *fused_linear(self, self.input_projections()))
        pairs = len(set(self.kv_sources().values()))
        rotated = self.hq + pairs * self.h
        heads = out[..., :rotated * self.dk].view(B, T, rotated, self.dk)
        if self.config.qk_norm:
            for norm, part in ((self.q_norm, heads[:, :, :self.hq]), (self.k_norm, heads[:, :, self.hq:])):
                part.copy_(rms_norm(part, norm.weight, norm.eps))
        ops.rotary_(heads, cos, sin)
        q = out[..., :self.hq * self.dk].view(B, T, self.hq, self.dk)
        k_at, v_at = self.hq * self.dk, rotated * self.dk
        kv = []
        for i in range(pairs):
            kv += [out[..., k_at + i * self.h * self.dk:k_at + (i + 1) * self.h * self.dk].view(B, T, self.h, self.dk),
                   out[..., v_at + i * self.h * self.dv:v_at + (i + 1) * self.h * self.dv].view(B, T, self.h, self.dv)]
        gates = []
        if self.config.attention == "nsa":
            gates = [torch.sigmoid(out[..., v_at + pairs * self.h * self.dv:]).view(B, T, self.hq, 3)]
        return (q, *kv, *gates)

    def unpack(self, projected: tuple[torch.Tensor, ...]):
        """project()'s outputs -> q, {branch: (k, v)}, gates (None for attention 'full')."""
        q = projected[0]
        branch_kv = {b: (projected[1 + 2 * i], projected[2 + 2 * i]) for b, i in self.kv_sources().items()}
        return q, branch_kv, projected[-1] if self.config.attention == "nsa" else None

    def compress(self, k_blocks: torch.Tensor, v_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi over blocks [B, N, l, H, D] -> compressed keys and values [B, N, H, D]."""
        if self.config.compression == "mean":
            return (k_blocks.float().mean(2).to(k_blocks.dtype), v_blocks.float().mean(2).to(v_blocks.dtype))
        return self.k_compress(k_blocks), self.v_compress(v_blocks)

    # ---- prefill (a slice of the prompt at positions start..start+T-1) -------------------------------------------

    def prefill(self, x, cos, sin, ops: Kernels, sdpa_backend: str | None, cache: dict | None, rows: slice,
                start: int = 0):
        """x [B, T, hidden] (normed) of the prompt tokens at positions start..start+T-1 -> attention output after
        o_proj [B, T, hidden]. The queries see cache[rows]'s first `start` tokens and the slice's own; the slice is
        written into cache[rows] (cache None: a whole prompt, start 0, nothing kept)."""
        c = self.config
        B, T, _ = x.shape
        q, branch_kv, gates = self.unpack(self.project(x, cos, sin, ops))
        slc_kv = self._keys_so_far(*branch_kv["slc"], cache, rows, start)
        k_cmp = v_cmp = win_kv = None
        if c.compressed:  # NSA, and the block means of sparse
            k_cmp, v_cmp = self._compressed_so_far(*branch_kv["cmp"], cache, rows, start)
            if c.window:
                win_kv = self._window_so_far(*branch_kv["win"], slc_kv, cache, rows, start)
        o = self.attend_prefill(q, slc_kv, k_cmp, v_cmp, win_kv, gates, ops, sdpa_backend)
        return self.o_proj(o.reshape(B, T, self.hq * self.dv))

    def _keys_so_far(self, k, v, cache: dict | None, rows: slice, start: int):
        """The slice's selection keys/values [B, T, H, D] into cache[rows] at [start, start+T) -> those of every
        token so far, [B, start+T, H, D]."""
        if cache is None:
            return k, v
        end = start + k.shape[1]
        cache["k"][rows, start:end], cache["v"][rows, start:end, :, :self.dv] = k, v
        return (k, v) if not start else (cache["k"][rows, :end], cache["v"][rows, :end, :, :self.dv])

    def _compressed_so_far(self, k, v, cache: dict | None, rows: slice, start: int):
        """Compressed blocks of every token so far [B, Tc, H, D] from the slice's compression-branch keys/values
        [B, T, H, D]: the blocks it completes (reaching back into the ring's last block_len tokens) are made and
        written into cache[rows], with the ring; the earlier ones come from the cache."""
        c = self.config
        first = num_compressed_blocks(start, c.block_len, c.block_stride)  # blocks complete before the slice
        k_from, v_from = k, v
        if start:  # block `first` starts at most block_len - 1 tokens before the slice
            slots = torch.arange(first * c.block_stride, start, device=k.device) % c.block_len
            k_from = torch.cat([cache["k_ring"][rows][:, slots], k], 1)
            v_from = torch.cat([cache["v_ring"][rows][:, slots], v], 1)
        k_new, v_new = self.compress(_blocks(k_from, c.block_len, c.block_stride),
                                     _blocks(v_from, c.block_len, c.block_stride))
        if cache is None:
            return k_new, v_new
        _fill_ring(cache["k_ring"], cache["v_ring"], rows, k, v, start)
        last = first + k_new.shape[1]
        cache["k_cmp"][rows, first:last], cache["v_cmp"][rows, first:last] = k_new, v_new
        return (k_new, v_new) if not start else (cache["k_cmp"][rows, :last], cache["v_cmp"][rows, :last])

    def _window_so_far(self, k, v, slc_kv, cache: dict | None, rows: slice, start: int):
        """Window-branch keys/values the slice's queries may see: tokens [max(0, start - w), start + T) (shared
        K/V: from the selection keys so far; else the window ring's last w tokens, then the slice's own, which
        go into the ring)."""
        lo = max(0, start - self.config.window)
        if self.config.shared_kv:
            return slc_kv[0][:, lo:], slc_kv[1][:, lo:]
        k_from, v_from = k, v
        if start:
            slots = torch.arange(lo, start, device=k.device) % self.config.window
            k_from = torch.cat([cache["k_win"][rows][:, slots], k], 1)
            v_from = torch.cat([cache["v_win"][rows][:, slots], v], 1)
        if cache is not None:
            _fill_ring(cache["k_win"], cache["v_win"], rows, k, v, start)
        return k_from, v_from

    def prefill_packed(self, x, cos, sin, ops: Kernels, sdpa_backend: str | None, cache: dict | None,
                       pack: "Pack"):
        """x [1, T, hidden] (normed): whole prompts packed along T (pack.offsets), each at its positions 0..len-1 ->
        attention output after o_proj [1, T, hidden]. Each prompt sees only its own tokens; its keys/values (NSA's
        and sparse's blocks and rings too) go into its cache slot, pack.slots[n] (cache None: nothing kept)."""
        c = self.config
        T = x.shape[1]
        q, branch_kv, gates = self.unpack(self.project(x, cos, sin, ops))
        k, v = branch_kv["slc"]
        if cache is not None:
            cache["k"][pack.token_slots, pack.positions] = k[0]
            cache["v"][pack.token_slots, pack.positions, :, :self.dv] = v[0]
        k_cmp = v_cmp = win_kv = None
        if c.compressed:  # NSA, and the block means of sparse: every sequence's complete blocks, packed per sequence
            k_src, v_src = branch_kv["cmp"]
            k_cmp, v_cmp = self.compress(k_src[0, pack.block_tokens][None], v_src[0, pack.block_tokens][None])
            if cache is not None:
                cache["k_cmp"][pack.block_slots, pack.block_numbers] = k_cmp[0]
                cache["v_cmp"][pack.block_slots, pack.block_numbers] = v_cmp[0]
                ring = pack.ring(c.block_len)
                cache["k_ring"][ring.slots, ring.at] = k_src[0, ring.tokens]
                cache["v_ring"][ring.slots, ring.at] = v_src[0, ring.tokens]
            if c.window:
                win_kv = branch_kv["win"]  # the selection keys themselves when K/V are shared
                if cache is not None and "k_win" in cache:
                    ring = pack.ring(c.window)
                    cache["k_win"][ring.slots, ring.at] = win_kv[0][0, ring.tokens]
                    cache["v_win"][ring.slots, ring.at] = win_kv[1][0, ring.tokens]
        o = self.attend_prefill(q, (k, v), k_cmp, v_cmp, win_kv, gates, ops, sdpa_backend, pack)
        return self.o_proj(o.reshape(1, T, self.hq * self.dv))

    def attend_prefill(self, q, slc_kv, k_cmp, v_cmp, win_kv, gates, ops: Kernels, sdpa_backend: str | None,
                       pack: "Pack | None" = None):
        """The attention of a prompt slice: q [B, T, HQ, Dk], the last T positions of the S = slc_kv[0].shape[1]
        tokens so far (keys [B, S, H, Dk]; compressed blocks of the S tokens; window keys ending at S) -> o [B, T,
        HQ, Dv]; NSA's three gated branches, or causal attention (our kernel, or SDPA on `sdpa_backend`). With a
        pack: B == 1 and T == S hold whole sequences packed along T (compressed blocks packed per sequence), each
        attending to itself alone, through the kernels' cu_seqlens."""
        if self.skip_attention:
            return q.new_zeros(*q.shape[:3], self.dv)
        c = self.config
        k_slc, v_slc = slc_kv
        seq_len = None if pack is not None else k_slc.shape[1]
        cu_seqlens = None if pack is None else pack.cu_seqlens
        if c.attention == "full":
            if not sdpa_backend:
                return ops.attention(q, k_slc, v_slc, causal=True, window=c.sliding_window, cu_seqlens=cu_seqlens)
            width = sdpa_value_width(sdpa_backend, self.dk, self.dv, q.device, q.dtype)
            v_slc = F.pad(v_slc, (0, width - self.dv))
            if pack is None:
                return sdpa(q, k_slc, v_slc, sdpa_backend)[..., :self.dv]
            return torch.cat([sdpa(q[:, a:b], k_slc[:, a:b], v_slc[:, a:b], sdpa_backend)[..., :self.dv]
                              for a, b in zip(pack.offsets, pack.offsets[1:])], 1)  # SDPA has no cu_seqlens
        q = q.contiguous()  # a view of the projection; the three NSA kernels would each copy it
        if c.attention == "sparse":
            from nsa_eval.model_adapters.runtime.sparse import sparse_attention_over_blocks

            return sparse_attention_over_blocks(q, k_slc, v_slc, k_cmp, c.sparse, ops, observe=self.observe,
                                                cu_seqlens=cu_seqlens)
        g_cmp, g_slc, g_win = gates.unbind(-1)
        o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, layout=self.layout, seq_len=seq_len,
                                              cu_seqlens=cu_seqlens)
        indices = ops.select_blocks(q, k_cmp, lse, layout=self.layout, seq_len=seq_len, cu_seqlens=cu_seqlens)
        if self.observe is not None and pack is None:
            self.observe(q, k_slc, indices)
        elif self.observe is not None:  # per sequence: each one's block indices count from its own position 0
            for a, b in zip(pack.offsets, pack.offsets[1:]):
                self.observe(q[:, a:b], k_slc[:, a:b], indices[:, a:b])
        branches = [o_cmp, g_cmp, ops.selected_attention(q, k_slc, v_slc, indices, layout=self.layout,
                                                         cu_seqlens=cu_seqlens), g_slc]
        if c.window:
            branches += [ops.attention(q, *win_kv, causal=True, window=c.window, cu_seqlens=cu_seqlens), g_win]
        return ops.gated_sum(*branches)

    # ---- decode (one token per sequence) -------------------------------------------------------------------

    def decode(self, x, step: "DecodeIndex", cos, sin, ops: Kernels, sdpa_backend: str | None, cache: dict,
               sdpa_length: int, compress: bool) -> torch.Tensor:
        """x [B, 1, hidden] (normed) of the tokens at step.positions. Writes their K/V into the cache and returns the
        attention output after o_proj [B, 1, hidden]. Graph-safe: no host synchronisation. compress: some row
        completes a compressed block with this token (else phi is skipped). sdpa_length: keys SDPA reads (the
        full-attention baseline only)."""
        c = self.config
        B = x.shape[0]
        q, branch_kv, gates = self.unpack(self.project(x, cos, sin, ops))
        # every row's new keys/values into its slot of each cache tensor: one launch
        writes = [("k", "slc", 0, step.positions), ("v", "slc", 1, step.positions)]
        if c.compressed:
            writes += [("k_ring", "cmp", 0, step.ring_slot), ("v_ring", "cmp", 1, step.ring_slot)]
            if "k_win" in cache:
                writes += [("k_win", "win", 0, step.window_slot), ("v_win", "win", 1, step.window_slot)]
        ops.cache_write_([cache[key] if key != "v" else cache[key][..., :self.dv] for key, _, _, _ in writes],
                         [branch_kv[branch][i][:, 0] for _, branch, i, _ in writes], [slot for *_, slot in writes])
        if compress:
            self._append_block(cache, step)
        o = self.attend_decode(q[:, 0], gates, cache, step, ops, sdpa_backend, sdpa_length)
        return self.o_proj(o.to(x.dtype).reshape(B, 1, self.hq * self.dv))

    def attend_decode(self, q, gates, cache: dict, step: "DecodeIndex", ops: Kernels, sdpa_backend: str | None,
                      sdpa_length: int) -> torch.Tensor:
        """The attention of one new token per sequence over the cache: q [B, HQ, Dk] -> o [B, HQ, Dv]."""
        if self.skip_attention:
            return q.new_zeros(*q.shape[:2], self.dv)
        c = self.config
        lengths = step.lengths
        if c.attention == "full":
            if sdpa_backend:
                keys, values = cache["k"][:, :sdpa_length], cache["v"][:, :sdpa_length]  # values maybe padded
                return sdpa(q[:, None], keys, values, sdpa_backend)[:, 0, :, :self.dv]
            if q.device.type != "cuda":  # no graph to keep shapes for: read only the keys some row has
                return ops.attention_decode(q, cache["k"][:, :sdpa_length], cache["v"][:, :sdpa_length], lengths,
                                            window=c.sliding_window)
            return ops.attention_decode(q, cache["k"], cache["v"], lengths, window=c.sliding_window)
        if c.attention == "sparse":  # the selection branch alone: gates 0 / 1
            s = c.sparse
            return ops.nsa_decode(q, cache["k"], cache["v"], cache["k_cmp"], cache["v_cmp"], lengths,
                                  q.new_zeros(q.shape[:2]), q.new_ones(q.shape[:2]), None, layout=self.layout,
                                  leading_blocks=s.leading_blocks, local_tokens=s.local)
        g_cmp, g_slc, g_win = gates[:, 0].unbind(-1)
        if "k_win" not in cache:  # one shared K/V (or no window): one kernel call
            return ops.nsa_decode(q, cache["k"], cache["v"], cache["k_cmp"], cache["v_cmp"], lengths, g_cmp, g_slc,
                                  g_win if c.window else None, layout=self.layout)
        return ops.nsa_decode(q, cache["k"], cache["v"], cache["k_cmp"], cache["v_cmp"], lengths, g_cmp, g_slc, g_win,
                              layout=self.layout, k_window=cache["k_win"], v_window=cache["v_win"])

    def _append_block(self, cache: dict, step: "DecodeIndex") -> None:
        """Write the compressed block that the newest token completes (in rows where it completes one), from the
        ring."""
        c = self.config
        rows, length = step.rows, step.lengths.long()
        complete = (length >= c.block_len) & ((length - c.block_len) % c.block_stride == 0)
        block = (length - c.block_len).clamp(min=0) // c.block_stride
        order = (length[:, None] - c.block_len + torch.arange(c.block_len, device=length.device)) % c.block_len
        k_new, v_new = self.compress(cache["k_ring"][rows[:, None], order][:, None],
                                     cache["v_ring"][rows[:, None], order][:, None])
        for key, new in (("k_cmp", k_new[:, 0]), ("v_cmp", v_new[:, 0])):
            old = cache[key][rows, block]
            cache[key][rows, block] = torch.where(complete[:, None, None], new.to(old.dtype), old)


class DecodeIndex(NamedTuple):
    """Where a decode step writes and reads, computed once per step for every layer: rows [B] (arange), positions
    [B] long (the new tokens'), lengths [B] int32 (positions + 1), ring_slot (positions % block_len) and
    window_slot (positions % window); the last two None where the model has no use for them."""
    rows: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    ring_slot: torch.Tensor | None
    window_slot: torch.Tensor | None


class Ring(NamedTuple):
    """Where a pack's tokens go in a ring of `size` slots (token p in slot p % size): the last min(len, size) tokens
    of each sequence, as indices into the pack (tokens [R]), their cache slots (slots [R]) and ring positions
    (at [R])."""
    tokens: torch.Tensor
    slots: torch.Tensor
    at: torch.Tensor


class Pack:
    """Whole sequences packed along T for one prefill pass, and where their tokens and blocks go, computed once per
    pass for every layer (host arithmetic, then one copy of each index to the device).

    offsets: host list [N+1] of token offsets (sequence n is tokens offsets[n]:offsets[n+1]); cu_seqlens: the same,
    int32 on the device; positions [T] long: each token's position in its own sequence; last [N] long: each
    sequence's last token. slots: the cache slot of each sequence (None: no cache), token_slots [T] each token's.
    Compressed blocks (NSA, sparse's block means), packed per sequence: block_tokens [Nc, l] the tokens of each
    (indices into the pack), block_slots [Nc] and block_numbers [Nc] where it goes in the cache."""

    def __init__(self, config: ModelConfig, lengths: list[int], slots: list[int] | None, device: torch.device):
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a pack needs sequences of at least one token, got lengths {lengths}")
        self.config, self.lengths, self.slots = config, lengths, slots
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        starts = torch.tensor(self.offsets[:-1])
        counts = torch.tensor(lengths)
        total = self.offsets[-1]
        self._host_positions = torch.arange(total) - starts.repeat_interleave(counts)
        self._host_lengths = counts.repeat_interleave(counts)  # each token's sequence length
        self.device = device
        self.cu_seqlens = torch.tensor(self.offsets, dtype=torch.int32, device=device)
        self.positions = self._host_positions.to(device)
        self.last = (torch.tensor(self.offsets[1:]) - 1).to(device)
        self.token_slots = None if slots is None else \
            torch.tensor(slots).repeat_interleave(counts).to(device)
        if config.compressed:
            l, d = config.block_len, config.block_stride
            blocks = [num_compressed_blocks(n, l, d) for n in lengths]
            first = torch.cat([start + torch.arange(b) * d for start, b in zip(self.offsets, blocks)]) \
                if sum(blocks) else torch.zeros(0, dtype=torch.long)
            self.block_tokens = (first[:, None] + torch.arange(l)).to(device)
            self.block_numbers = torch.cat([torch.arange(b) for b in blocks]).to(device)
            self.block_slots = None if slots is None else \
                torch.tensor(slots).repeat_interleave(torch.tensor(blocks)).to(device)
        self._rings: dict[int, Ring] = {}

    def ring(self, size: int) -> Ring:
        """The ring of `size` slots (Ring); made once per size."""
        if size not in self._rings:
            assert self.slots is not None, "a pack without slots writes no ring"
            kept = self._host_positions >= self._host_lengths - size
            tokens = kept.nonzero()[:, 0]
            slots = torch.tensor(self.slots).repeat_interleave(torch.tensor(self.lengths))[tokens]
            self._rings[size] = Ring(tokens.to(self.device), slots.to(self.device),
                                     (self._host_positions[tokens] % size).to(self.device))
        return self._rings[size]


def block_completes(config: ModelConfig, lengths: list[int]) -> bool:
    """Whether a decode step that brings some row to one of these lengths (tokens after the step) completes a
    compressed block in that row."""
    return config.compressed and any(
        n >= config.block_len and (n - config.block_len) % config.block_stride == 0 for n in lengths)


def _blocks(x: torch.Tensor, block_len: int, stride: int) -> torch.Tensor:
    """x [B, T, H, D] -> its complete blocks [B, N, block_len, H, D] (block i: tokens [i*stride, i*stride + len))."""
    if x.shape[1] < block_len:
        return x.new_zeros(x.shape[0], 0, block_len, *x.shape[2:])
    return x.unfold(1, block_len, stride).permute(0, 1, 4, 2, 3)


def _fill_ring(k_ring: torch.Tensor, v_ring: torch.Tensor, rows: slice, k: torch.Tensor, v: torch.Tensor,
               start: int = 0) -> None:
    """Put the last `slots` tokens of k, v [B, T, H, D] (positions start..start+T-1) into rings [B, slots, H, D]
    at p % slots."""
    slots, T = k_ring.shape[1], k.shape[1]
    index = torch.arange(max(0, T - slots), T, device=k.device)
    k_ring[rows, (start + index) % slots], v_ring[rows, (start + index) % slots] = k[:, index], v[:, index]

