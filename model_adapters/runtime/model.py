"""The decoder as a plain nn.Module (gpt-fast style): embeddings, layers of (RMSNorm, attention, RMSNorm, SwiGLU),
a final norm and the LM head, over the runtime's slot cache.

The engine's entry points (runtime/engine.py):
- `prefill(ids, cache, row)`: one prompt [T] into one row of the cache, in slices of `prefill_chunk` tokens (each
  slice's queries attend to the cache so far plus the slice: the kernels take queries that are the last T of S keys),
  so a long prompt's attention working set is bounded by the slice and nothing is padded -> the last logits [V].
- `prefill_packed(prompts, cache, rows)`: several whole prompts packed along T in one pass (no padding: full
  attention and NSA's branches over the pack through the kernels' cu_seqlens, runtime/attention.py `Pack`), prompt n
  into row rows[n] -> each prompt's last logits [N, V].
- `decode(ids, cache, rows)`: one token for every row in [0, rows) -> logits [rows, V]; rows whose `active` flag is 0
  compute but neither advance nor matter. On CUDA the step is replayed from a CUDA graph per (rows, compress) after
  its first call (compress: some row completes a compressed block, so NSA's phi runs; the other graph skips it).
- `score_positions(sequences, positions, targets)`: log P(target) at chosen positions of sequences packed in one
  pass (or one sequence through the sliced prefill), the LM head at those positions only: log-likelihoods and
  rolling windows (model_adapters/scoring.py).
`forward` answers the calls of a transformers causal LM (a prompt batch, optionally padded, then decode steps over
the cache it returned) for tests and benchmarks. The pointwise parts (RMSNorm fused with the
residual add, RoPE, SwiGLU's silu * up) run on nsa_eval.kernels.layers; attention's input projections are one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from nsa_eval.model_adapters.runtime.attention import Attention, DecodeIndex, Pack, block_completes
from nsa_eval.model_adapters.runtime.cache import SlotCache, grow_cache, new_cache
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.ops import Kernels, RMSNorm, fused_linear, kernel_table, sdpa_value_width
from nsa_eval.model_adapters.runtime.rope import inv_frequencies, rope_tables

DEFAULT_PREFILL_CHUNK = 8192  # prompt tokens per prefill slice on CUDA unless told otherwise


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, silu_mul) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]: gate and up as one GEMM, silu(gate) * up by `silu_mul` (an ops kernel)."""
        return self.down_proj(silu_mul(F.linear(x, *fused_linear(self, [self.gate_proj, self.up_proj]))))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: SlotCache | None = None


class Transformer(nn.Module):
    """The decoder (module docstring). Attributes a caller may set: `kernel_choice` ('auto': Triton on CUDA tensors, 'cpu'
    elsewhere; 'triton'; 'triton-fused' (NSA decode in two launches); 'reference'; 'cpu': runtime/ops.py), `sdpa_backend` (None, or 'flash' / 'cudnn' / 'efficient' / 'math'
    for attention 'full' through PyTorch SDPA: the baseline of `nsa-eval bench model`; a CUDA-graph decode step on it
    reads the number of keys of the step it captured, so decode with cuda_graphs off there), `prefill_chunk` (prompt
    tokens per slice; None: DEFAULT_PREFILL_CHUNK on CUDA, one pass elsewhere; 0: one pass), `decode_reserve` (cache
    positions `forward` allocates beyond a prompt, and adds when a decode step finds the cache full), `cuda_graphs`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq, self.rope_scale = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                                                    config.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.kernel_choice = "auto"
        self.sdpa_backend: str | None = None
        self.prefill_chunk: int | None = None
        self.decode_reserve = 256
        self.cuda_graphs = True

    def _apply(self, fn, recurse=True):
        """As nn.Module's (.to, .cuda, .half, ...), but inv_freq stays float32: in 16 bits the RoPE angles of late
        positions drift (a bfloat16 inv_freq puts position 1600 off by several radians in the fast dimensions)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if not inv_freq.is_meta:  # a model built on the meta device gets its inv_freq after (checkpoint.py)
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Transformer":
        """Random weights (normal(0, std) for every matrix, zero biases, unit norms): for tests and benchmarks."""
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator, device="cpu") * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def _ops(self) -> Kernels:
        if self.kernel_choice == "auto":
            return kernel_table("triton" if self.device.type == "cuda" else "cpu")
        return kernel_table(self.kernel_choice)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(positions, self.inv_freq, self.rope_scale)

    # ---- cache -----------------------------------------------------------------------------------------------

    def new_cache(self, slots: int, capacity: int) -> SlotCache:
        """An empty cache of `slots` rows of up to `capacity` tokens (every row free, length 1)."""
        c = self.config
        # SDPA backends that need Dv == Dk read V zero-padded from the cache (no copy per step)
        width = sdpa_value_width(self.sdpa_backend, c.head_dim, c.v_head_dim, self.device, self.dtype) \
            if c.attention == "full" and self.sdpa_backend else None
        cache = new_cache(c, slots, capacity, self.device, self.dtype, width)
        cache.set_active(list(range(slots)), False)
        return cache

    # ---- the engine's entry points ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: SlotCache, row: int) -> torch.Tensor:
        """A prompt ids [T] (long, on the model's device) into row `row` of the cache (its earlier contents dropped),
        in slices of prefill_chunk tokens -> the last position's logits [V] (model dtype). The row is then active
        with length T."""
        T = ids.shape[0]
        if T + 1 > cache.capacity:
            raise ValueError(f"a prompt of {T} tokens does not fit a cache of {cache.capacity} positions")
        rows = slice(row, row + 1)
        hidden = self._prefill(ids[None], cache, rows, last_only=True)
        cache.lengths[row] = T
        cache.host_lengths[row] = T
        cache.set_active([row], True)
        normed, _ = self._ops().add_rms_norm(hidden[:, -1:], self.norm.weight, self.config.rms_norm_eps)
        return self.lm_head(normed)[0, 0]

    @torch.no_grad()
    def decode(self, cache: SlotCache, rows: int, head: Callable[[torch.Tensor], torch.Tensor] | None = None,
               head_key: Any = None) -> torch.Tensor:
        """One token per row of [0, rows), read from cache.ids[:rows]; active rows advance by one. Without a head:
        -> logits [rows, V]. With one: head(logits) -> tokens [rows] long, also written into cache.ids[:rows] (the
        next step's input) -- sampling in the same graph as the step. Replayed on CUDA from a CUDA graph per (rows,
        compress, head_key) after its first (eager) call; the result is the graph's own tensor until the next
        replay."""
        active = [r for r in range(rows) if cache.host_active[r]]
        after = [cache.host_lengths[r] + 1 for r in active]
        if after and max(after) > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions per row; a row would reach {max(after)}")
        compress = block_completes(self.config, after)
        sdpa_length = max(after, default=1)  # SDPA (the baseline) reads this many keys; frozen in a graph

        def step() -> torch.Tensor:
            logits = self._decode_step(cache.ids[:rows], cache, rows, sdpa_length, compress)
            if head is None:
                return logits
            tokens = head(logits)
            cache.ids[:rows].copy_(tokens)
            return tokens

        out = cache.graphs.decode((rows, compress, head_key), step, cache.ids.device, self.cuda_graphs)
        for r in active:
            cache.host_lengths[r] += 1
        return out

    @torch.no_grad()
    def prefill_packed(self, prompts: list[torch.Tensor], cache: SlotCache, rows: list[int]) -> torch.Tensor:
        """Prompts ids [T_n] (long, on the model's device) packed along T into one pass (no slices: the caller keeps
        the pack within its token budget), prompt n into row rows[n] of the cache (its earlier contents dropped) ->
        each prompt's last logits [N, V] (model dtype). The rows are then active with lengths T_n. Each prompt's
        logits equal `prefill`'s of it alone (to float rounding: the GEMMs see other shapes)."""
        lengths = [ids.shape[0] for ids in prompts]
        if max(lengths) + 1 > cache.capacity:
            raise ValueError(f"a prompt of {max(lengths)} tokens does not fit a cache of {cache.capacity} positions")
        if len(set(rows)) != len(rows):
            raise ValueError(f"a packed prefill writes each prompt into its own row, got rows {rows}")
        pack = Pack(self.config, lengths, rows, self.device)
        hidden = self._prefill_slice(torch.cat(prompts)[None], 0, cache, slice(None), pack)
        cache.lengths[rows] = torch.tensor(lengths, dtype=torch.int32, device=cache.lengths.device)
        for row, n in zip(rows, lengths):
            cache.host_lengths[row] = n
        cache.set_active(rows, True)
        normed, _ = self._ops().add_rms_norm(hidden[:, pack.last], self.norm.weight, self.config.rms_norm_eps)
        return self.lm_head(normed)[0]

    @torch.no_grad()
    def score_positions(self, sequences: list[torch.Tensor], positions: torch.Tensor, targets: torch.Tensor,
                        rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ids [T_n] (long, on the model's device) through the model -> (log P(targets[m] | the tokens up
        to and including positions[m]) [M] float32, whether targets[m] is the most likely token there [M] bool).
        positions [M] long index the sequences concatenated (sequence n's token j at offset_n + j; a position may
        repeat). Several sequences go packed in one pass (Pack; no slices: the caller keeps the pack within its token
        budget); one alone goes through the prefill in slices of prefill_chunk over a cache of its own (a long
        window). The final norm, the LM head and the log-softmax run on the distinct positions only, `rows` at a
        time: a window's [T, V] logits never exist whole (the perplexity of a 32k window)."""
        if len(sequences) == 1:
            hidden = self._prefill(sequences[0][None], None, slice(None))[0]
        else:
            pack = Pack(self.config, [ids.shape[0] for ids in sequences], None, self.device)
            hidden = self._prefill_slice(torch.cat(sequences)[None], 0, None, slice(None), pack)[0]
        distinct, which = positions.unique(return_inverse=True)
        logprobs = torch.empty(positions.shape[0], dtype=torch.float32, device=hidden.device)
        greedy = torch.empty(positions.shape[0], dtype=torch.bool, device=hidden.device)
        for start in range(0, distinct.shape[0], rows):
            normed, _ = self._ops().add_rms_norm(hidden[None, distinct[start:start + rows]], self.norm.weight,
                                                 self.config.rms_norm_eps)
            table = torch.log_softmax(self.lm_head(normed)[0].float(), dim=-1)  # [rows, V]
            mine = (which >= start) & (which < start + rows)
            local, wanted = which[mine] - start, targets[mine]
            logprobs[mine] = table[local, wanted]
            greedy[mine] = table.argmax(-1)[local] == wanted
        return logprobs, greedy

    # ---- the transformers-like entry point -----------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: SlotCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, **_: Any) -> CausalLMOutput:
        """A prompt (past_key_values None): input_ids [B, T], attention_mask [B, T] (1 = token; each row's tokens
        contiguous, left or right padded) -> logits [B, T, V] (zeros at padding), or of the last logits_to_keep
        positions, and (use_cache) a cache with row b = prompt b. A decode step: input_ids [B, 1] and that cache ->
        logits [B, 1, V]. position_ids are implied (each row from 0) and ignored."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        with torch.no_grad():
            if past_key_values is not None:
                batch = past_key_values.slots
                if tuple(input_ids.shape) != (batch, 1):
                    raise ValueError(f"a decode step takes one token per cached sequence ([{batch}, 1]), got "
                                     f"input_ids {tuple(input_ids.shape)}")
                needed = max(past_key_values.host_lengths) + 1
                if needed > past_key_values.capacity:  # grow by decode_reserve at once: a growth drops the graphs
                    grow_cache(self.config, past_key_values, needed + self.decode_reserve)
                past_key_values.ids.copy_(input_ids[:, 0])
                logits = self.decode(past_key_values, batch)
                return CausalLMOutput(logits.clone()[:, None], past_key_values)
            return self._prompt(input_ids, attention_mask, use_cache, logits_to_keep)

    def _prompt(self, input_ids, attention_mask, use_cache, logits_to_keep) -> CausalLMOutput:
        B, T = input_ids.shape
        spans = token_spans(attention_mask, B, T)
        cache = self.new_cache(B, max(e - s for s, e in spans) + self.decode_reserve) if use_cache else None
        keep_from = T - logits_to_keep if 0 < logits_to_keep < T else 0
        logits = torch.zeros(B, T - keep_from, self.config.vocab_size, device=self.device, dtype=self.dtype)
        groups = [(slice(None), 0, T)] if all(span == (0, T) for span in spans) else \
            [(slice(r, r + 1), s, e) for r, (s, e) in enumerate(spans)]
        for rows, start, end in groups:
            hidden = self._prefill(input_ids[rows, start:end], cache, rows)
            first = max(start, keep_from)
            if first < end:
                normed, _ = self._ops().add_rms_norm(hidden[:, first - start:], self.norm.weight, self.config.rms_norm_eps)
                logits[rows, first - keep_from:end - keep_from] = self.lm_head(normed)
        if cache is not None:
            for r, (s, e) in enumerate(spans):
                cache.lengths[r] = cache.host_lengths[r] = e - s
            cache.set_active(list(range(B)), True)
        return CausalLMOutput(logits, cache)

    # ---- prefill and decode --------------------------------------------------------------------------------

    def _prefill(self, ids: torch.Tensor, cache: SlotCache | None, rows: slice, last_only: bool = False) -> torch.Tensor:
        """Tokens ids [b, T] at positions 0..T-1 through every layer, in slices of `prefill_chunk` tokens over the
        cache -> last hidden states [b, T, hidden] (before the final norm; last_only: of the last slice only); fills
        cache[rows] (a cache of its own when sliced without one)."""
        b, T = ids.shape
        step = self.prefill_chunk  # None, 0 or a positive count (nsa_eval.models.LoadOptions checks --prefill-chunk)
        if step is None:
            step = DEFAULT_PREFILL_CHUNK if self.device.type == "cuda" else T
        step = step or T
        if cache is None and step < T:
            cache, rows = self.new_cache(b, T), slice(None)
        hidden = []
        for start in range(0, T, step):
            h = self._prefill_slice(ids[:, start:start + step], start, cache, rows)
            hidden = [h] if last_only else hidden + [h]
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, 1)

    def _prefill_slice(self, ids: torch.Tensor, start: int, cache: SlotCache | None, rows: slice,
                       pack: Pack | None = None) -> torch.Tensor:
        """Tokens ids [b, T] at positions start..start+T-1 (the cache holds the earlier ones) -> hidden [b, T, hidden].
        With a pack: ids [1, T] are whole sequences packed along T (positions from each one's 0; start 0), each into
        its own slot pack.slots[n] (rows unused)."""
        b, T = ids.shape
        c = self.config
        ops = self._ops()
        positions = torch.arange(start, start + T, device=ids.device).expand(b, T) if pack is None else \
            pack.positions[None]
        cos, sin = self._rope(positions)
        h, delta = self.embed(ids), None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            normed, h = ops.add_rms_norm(h if delta is None else delta, layer.attn_norm.weight, c.rms_norm_eps,
                                         None if delta is None else h)
            if pack is None:
                delta = layer.attn.prefill(normed, cos, sin, ops, self.sdpa_backend, layer_cache, rows, start)
            else:
                delta = layer.attn.prefill_packed(normed, cos, sin, ops, self.sdpa_backend, layer_cache, pack)
            normed, h = ops.add_rms_norm(delta, layer.mlp_norm.weight, c.rms_norm_eps, h)
            delta = layer.mlp(normed, ops.silu_mul)
        return h + delta

    def _decode_step(self, ids: torch.Tensor, cache: SlotCache, rows: int, sdpa_length: int,
                     compress: bool) -> torch.Tensor:
        """One token per row of [0, rows), ids [rows] -> logits [rows, V]; advances the active rows' lengths on the
        device (graph-safe: no host synchronisation). compress: some row completes a compressed block."""
        c = self.config
        ops = self._ops()
        active = cache.active[:rows]
        positions = (cache.lengths[:rows] - 1 + active).long()  # a free row rewrites its position 0
        lengths = cache.lengths[:rows] + active
        step = DecodeIndex(torch.arange(rows, device=ids.device), positions, lengths,
                           positions % c.block_len if c.compressed else None,
                           positions % c.window if c.compressed and c.window else None)
        cos, sin = self._rope(positions[:, None])
        h, delta = self.embed(ids)[:, None], None
        for layer, layer_cache in zip(self.layers, cache.rows(rows)):
            normed, h = ops.add_rms_norm(h if delta is None else delta, layer.attn_norm.weight, c.rms_norm_eps,
                                         None if delta is None else h)
            delta = layer.attn.decode(normed, step, cos, sin, ops, self.sdpa_backend, layer_cache, sdpa_length,
                                      compress)
            normed, h = ops.add_rms_norm(delta, layer.mlp_norm.weight, c.rms_norm_eps, h)
            delta = layer.mlp(normed, ops.silu_mul)
        cache.lengths[:rows].copy_(lengths)
        normed, _ = ops.add_rms_norm(delta, self.norm.weight, c.rms_norm_eps, h)
        return self.lm_head(normed)[:, 0]


def token_spans(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int]]:
    """[(start, end)] of each row's tokens (mask 1), which must be contiguous (left or right padding)."""
    if attention_mask is None:
        return [(0, length)] * batch
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be [B, T] = [{batch}, {length}], got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    counts = mask.sum(-1)
    starts = (mask.int().cumsum(-1) == 0).sum(-1)
    spans = list(zip(starts.tolist(), (starts + counts).tolist()))
    for row, (s, e) in enumerate(spans):
        if e == s:
            raise ValueError(f"row {row} of attention_mask has no tokens")
        if not bool(mask[row, s:e].all()):
            raise ValueError(f"row {row} of attention_mask has a gap; pad on one side only")
    return spans
