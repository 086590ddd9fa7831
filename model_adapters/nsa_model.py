"""A decoder-only transformer whose attention is Native Sparse Attention (arXiv:2502.11089), gpt-fast style:
a plain nn.Module (RMSNorm, RoPE, SwiGLU, GQA) over our kernels (nsa_eval.kernels), with its own KV cache.

Attention (section 3 of the paper), per layer, for queries q and the keys/values of three branches:
    o = g_cmp * Attn(q, phi(K_cmp)) + g_slc * Attn(q, K_slc[selected blocks]) + g_win * Attn(q, K_win[last w])
- K/V per branch: independent projections (the paper; `shared_kv: false`) or one shared K/V for every branch
  (flash-linear-attention; `shared_kv: true`).
- phi (`compression`): "mlp", a learnable MLP over the l keys of a block plus an intra-block position
  embedding, shared by the KV heads; or "mean", mean pooling (flash-linear-attention). Blocks of length
  `block_len` every `block_stride` tokens, over the rotated keys.
- gates: sigmoid of one linear layer of the hidden state, 3 per query head (g_proj, [HQ, 3] interleaved).
- `attention: full` turns a config into the same transformer with plain causal GQA attention (the baseline of
  `nsa-eval bench model`).

Checkpoints: config.json (every hyperparameter, `model_type: nsa_eval`) + model.safetensors, a tokenizer beside
them. flash-linear-attention's NSA checkpoints (`model_type: nsa`) load through FLA_NAME_MAP.

The forward pass looks enough like a transformers causal LM for HFModel's decode loop (model_adapters/hf.py):
`model(input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep)` returns `.logits` and
`.past_key_values` (an NSACache). A prompt (no cache) is run row by row where `attention_mask` pads it (every row
starts at its own position 0), each row into its own slot of a right-padded cache, in slices of `prefill_chunk`
tokens: each slice's queries attend to the cache so far plus the slice (the kernels take queries that are the last
T of S keys), so a long prompt's attention working set is bounded by the slice; sliced equals one pass. A decode
step appends one token per row at that row's own length (`position_ids` and the mask are then not needed). On CUDA
the decode step is replayed from a CUDA graph after its first call (two graphs: phi runs only on the steps where a
row completes a compressed block). The pointwise parts (RMSNorm fused with the residual add, RoPE, SwiGLU's
silu * up) run on nsa_eval.kernels.layers; the attention's input projections (q, every K/V, the gates) are one GEMM.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from nsa_eval.kernels.nsa.utils import num_compressed_blocks
from nsa_eval.model_adapters.base import ModelLoadError
from nsa_eval.model_adapters.hf import DEFAULT_PREFILL_CHUNK

MODEL_TYPE = "nsa_eval"
FLA_MODEL_TYPE = "nsa"
WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NSAConfig:
    """Every hyperparameter of the model; config.json holds all of them (model_type nsa_eval).

    head_dim / v_head_dim: query-key and value head dims (the paper: 192 / 128). NSA: block_len l, block_stride d
    (compression), select_len l', num_selected n, window w (0: no window branch), compression "mlp" | "mean",
    compress_hidden_size (width of phi's MLP), shared_kv. attention "full" ignores the NSA fields.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    v_head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    attention: str = "nsa"
    block_len: int = 32
    block_stride: int = 16
    select_len: int = 64
    num_selected: int = 16
    window: int = 512
    compression: str = "mlp"
    compress_hidden_size: int = 256
    shared_kv: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = field(default=MODEL_TYPE, init=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "config") -> None:
        """ValueError naming the field and the fix for a config the model cannot be built from."""
        from nsa_eval.kernels.nsa.utils import check_block_sizes

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{where}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.attention not in ("nsa", "full"):
            raise ValueError(f"{where}: attention must be 'nsa' or 'full', got {self.attention!r}")
        if self.compression not in ("mlp", "mean"):
            raise ValueError(f"{where}: compression must be 'mlp' or 'mean', got {self.compression!r}")
        check_block_sizes(where, self.block_len, self.block_stride, self.select_len, self.num_selected, self.window)
        if self.compress_hidden_size < 1:
            raise ValueError(f"{where}: compress_hidden_size must be >= 1, got {self.compress_hidden_size}")

    @property
    def nsa(self) -> dict[str, int]:
        """The kernels' keyword arguments."""
        return dict(block_len=self.block_len, block_stride=self.block_stride, select_len=self.select_len,
                    num_selected=self.num_selected, window=self.window)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "architectures": ["NSAForCausalLM"],
                **{k: v for k, v in asdict(self).items() if k != "model_type"}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "NSAConfig":
        """Our config.json: the sizes, `attention`, and (for NSA) every NSA hyperparameter must be present."""
        required = list(REQUIRED_FIELDS) + (list(NSA_FIELDS) if data.get("attention") == "nsa" else [])
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; an nsa_eval checkpoint's config.json names every "
                             f"hyperparameter (NSAForCausalLM.save_pretrained writes them)")
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in known})


REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings", "attention")
NSA_FIELDS = ("block_len", "block_stride", "select_len", "num_selected", "window", "compression",
              "compress_hidden_size", "shared_kv")


# ---- flash-linear-attention's layout ----------------------------------------------------------------------------

# fla's parameter names (fla/models/nsa/modeling_nsa.py, fla/layers/nsa.py) -> ours
FLA_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embeddings\.weight", r"embed.weight"),
    (r"model\.layers\.(\d+)\.attn_norm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.attn\.(q|k|v|g|o)_proj\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
    (r"model\.layers\.(\d+)\.mlp_norm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight"),
    (r"model\.norm\.weight", r"norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]


def fla_name(name: str) -> str | None:
    """Our parameter name for one of fla's, or None for a name the map does not know."""
    for pattern, target in FLA_NAME_MAP:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def config_from_fla(data: dict[str, Any], where: str = "config") -> NSAConfig:
    """Our config for a flash-linear-attention NSA config (fla.models.NSAConfig; its defaults where a key is
    missing): l = d = l' = block_size, n = block_counts, w = window_size, mean pooling, one shared K/V."""
    unsupported = {"hidden_act": ("swish",), "elementwise_affine": (True, None), "attnres_block_size": (None,),
                   "use_l2warp": (False, None)}
    for key, allowed in unsupported.items():
        if key in data and data[key] not in allowed:
            raise ValueError(f"{where}: flash-linear-attention {key}={data[key]!r} is not supported (only "
                             f"{allowed[0]!r})")
    if "hidden_size" not in data or "num_hidden_layers" not in data:
        raise ValueError(f"{where} (model_type nsa) lacks hidden_size or num_hidden_layers")
    hidden = data["hidden_size"]
    num_heads = data.get("num_heads", 64)
    head_dim = data.get("head_dim", 32)
    intermediate = data.get("intermediate_size")
    if intermediate is None:  # fla.modules.GatedMLP's rule
        intermediate = int(hidden * (data.get("hidden_ratio") or 4) * 2 / 3)
        intermediate = 256 * ((intermediate + 255) // 256)
    block = data.get("block_size", 64)
    return NSAConfig(
        vocab_size=data.get("vocab_size", 32000), hidden_size=hidden, num_hidden_layers=data["num_hidden_layers"],
        num_attention_heads=num_heads, num_key_value_heads=data.get("num_kv_heads") or num_heads,
        head_dim=head_dim, v_head_dim=head_dim, intermediate_size=intermediate,
        max_position_embeddings=data.get("max_position_embeddings", 2048),
        attention="nsa", block_len=block, block_stride=block, select_len=block,
        num_selected=data.get("block_counts", 16), window=data.get("window_size") or 0, compression="mean",
        shared_kv=True, rope_theta=data.get("rope_theta") or 10000.0, rms_norm_eps=data.get("norm_eps", 1e-6),
        qkv_bias=bool(data.get("qkv_bias", False)), tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        bos_token_id=data.get("bos_token_id", 1), eos_token_id=data.get("eos_token_id", 2),
        pad_token_id=data.get("pad_token_id"),
    )


# ----------------------------------------------------------------------------------------------------------------
# kernels: Triton on CUDA tensors, the reference elsewhere; "triton" forces the Triton path (interpreter on CPU)
# ----------------------------------------------------------------------------------------------------------------


class Kernels(NamedTuple):
    compressed_attention: Any
    select_blocks: Any
    selected_attention: Any
    nsa_decode: Any
    attention: Any
    attention_decode: Any
    gated_sum: Any
    add_rms_norm: Any
    rotary_: Any
    silu_mul: Any
    cache_write_: Any


def kernels(name: str) -> Kernels:
    """'triton' or 'reference' (the same signatures; nsa_eval.kernels picks between them by device)."""
    if name == "triton":
        from nsa_eval.kernels.attention import decode as attention_decode_mod, parallel
        from nsa_eval.kernels.layers import cache_write, norm, rotary, swiglu
        from nsa_eval.kernels.nsa import compression, decode, parallel as nsa_parallel, selected, selection

        return Kernels(compression.compressed_attention, selection.select_blocks, selected.selected_attention,
                       decode.nsa_decode, parallel.attention, attention_decode_mod.attention_decode,
                       nsa_parallel.gated_sum, norm.add_rms_norm, rotary.rotary_, swiglu.silu_mul,
                       cache_write.cache_write_)
    if name == "reference":
        from nsa_eval.kernels.attention import reference as full_ref
        from nsa_eval.kernels.layers import reference as layers_ref
        from nsa_eval.kernels.nsa import reference

        return Kernels(reference.compressed_attention, reference.select_blocks, reference.selected_attention,
                       reference.nsa_decode, full_ref.attention, full_ref.attention_decode, reference.gated_sum,
                       layers_ref.add_rms_norm, layers_ref.rotary_, layers_ref.silu_mul, layers_ref.cache_write_)
    raise ValueError(f"kernels must be 'auto', 'triton' or 'reference', got {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """The weight and eps of an RMSNorm; the model applies it with ops.add_rms_norm (fused with the residual add)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, 1, dim/2] float32 (rotate-half RoPE, as Llama and fla)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def fused_linear(owner: nn.Module, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum of out_features, in_features] (and bias, zeros where a layer has none) for Linear layers of
    the same input, so they run as one GEMM whose output columns are theirs in order. Built on first use and again
    whenever a weight or bias is replaced (loading, .to()) or a bias changed in place; the layers' weights are then
    re-pointed at row slices of it, so the model holds each weight once and in-place changes reach both."""
    def key():  # (inference tensors keep no version counter, and cannot change outside inference mode)
        return tuple((x.data_ptr(), -1 if x.is_inference() else x._version) if x is not None else None
                     for linear in linears for x in (linear.weight, linear.bias))

    cached = owner.__dict__.get("_fused_linear")
    if cached is not None and cached[0] == key():
        return cached[1], cached[2]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, also when called under inference_mode
        weight = torch.cat([linear.weight for linear in linears])
        bias = None
        if any(linear.bias is not None for linear in linears):
            bias = torch.cat([linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features)
                              for linear in linears])
        offset = 0
        for linear in linears:
            rows = weight[offset:offset + linear.out_features]
            linear.weight = nn.Parameter(rows, requires_grad=linear.weight.requires_grad)
            offset += linear.out_features
    owner.__dict__["_fused_linear"] = (key(), weight, bias)
    return weight, bias


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, silu_mul) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]: gate and up as one GEMM, silu(gate) * up by `silu_mul` (an ops kernel)."""
        return self.down_proj(silu_mul(F.linear(x, *fused_linear(self, [self.gate_proj, self.up_proj]))))


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


# ----------------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------------


class NSACache:
    """KV cache of a batch of sequences, right-padded: sequence b holds tokens [0, lengths[b]).

    Per layer (a dict of tensors [B, slots, H, D]): "k", "v" the raw keys/values of the selection branch (and of
    the window when K/V are shared; every token, `capacity` slots); NSA adds "k_cmp", "v_cmp" (compressed blocks),
    "k_ring", "v_ring" (the compression branch's last block_len raw keys, token p in slot p % block_len) and, with
    independent K/V and a window, "k_win", "v_win" (the window branch's last w keys, token p in slot p % w).
    lengths: int32 [B] on the device (read by the kernels); host_lengths: the same on the host.
    """

    def __init__(self, layers: list[dict[str, torch.Tensor]], lengths: torch.Tensor, capacity: int):
        self.layers = layers
        self.lengths = lengths
        self.host_lengths = [0] * lengths.shape[0]
        self.capacity = capacity
        # CUDA graphs of a decode step over these tensors, one per `compress` (whether the step makes a compressed
        # block): {compress: (graph or "off" where capture failed, its logits [B, V])}, fed from graph_ids [B]
        self.graphs: dict[bool, tuple[Any, torch.Tensor | None]] = {}
        self.graph_ids: torch.Tensor | None = None

    def drop_graphs(self) -> None:
        """Forget the captured decode steps (after the tensors they read were replaced)."""
        self.graphs, self.graph_ids = {}, None


SEQUENCE_KEYS = ("k", "v")  # grow with the capacity
BLOCK_KEYS = ("k_cmp", "v_cmp")  # grow with num_compressed_blocks(capacity)


# ----------------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------------


class NSAAttention(nn.Module):
    """NSA (or, with attention 'full', plain causal GQA attention) of one layer; see the module docstring."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        c = config
        self.config = c
        self.hq, self.h, self.dk, self.dv = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.v_head_dim
        bias = c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, self.hq * self.dk, bias=bias)
        self.branches = ("cmp", "slc", "win") if c.window else ("cmp", "slc")
        if c.attention == "full" or c.shared_kv:
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
        self.o_proj = nn.Linear(self.hq * self.dv, c.hidden_size, bias=False)

    # ---- projections ---------------------------------------------------------------------------------------

    def kv_sources(self) -> dict[str, int]:
        """branch -> index of its (k, v) pair among project()'s outputs: one pair when K/V are shared."""
        if self.config.attention == "full":
            return {"slc": 0}
        if self.config.shared_kv:
            return {branch: 0 for branch in self.branches}
        return {branch: i for i, branch in enumerate(self.branches)}

    def input_projections(self) -> list[nn.Linear]:
        """The Linear layers of the attention's input, in the column order of project()'s one GEMM: q, every
        distinct key projection, every value projection, then the NSA gates."""
        if self.config.attention == "full" or self.config.shared_kv:
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
        ops.rotary_(out[..., :rotated * self.dk].view(B, T, rotated, self.dk), cos, sin)
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
        if c.attention == "nsa":
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

    def attend_prefill(self, q, slc_kv, k_cmp, v_cmp, win_kv, gates, ops: Kernels, sdpa_backend: str | None):
        """The attention of a prompt slice: q [B, T, HQ, Dk], the last T positions of the S = slc_kv[0].shape[1]
        tokens so far (keys [B, S, H, Dk]; compressed blocks of the S tokens; window keys ending at S) -> o [B, T,
        HQ, Dv]; NSA's three gated branches, or causal attention (our kernel, or SDPA on `sdpa_backend`)."""
        c = self.config
        k_slc, v_slc = slc_kv
        seq_len = k_slc.shape[1]
        if c.attention == "full":
            if not sdpa_backend:
                return ops.attention(q, k_slc, v_slc, causal=True)
            width = sdpa_value_width(sdpa_backend, self.dk, self.dv, q.device, q.dtype)
            return sdpa(q, k_slc, F.pad(v_slc, (0, width - self.dv)), sdpa_backend)[..., :self.dv]
        g_cmp, g_slc, g_win = gates.unbind(-1)
        q = q.contiguous()  # a view of the projection; the three NSA kernels would each copy it
        o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, block_len=c.block_len, block_stride=c.block_stride,
                                              seq_len=seq_len)
        indices = ops.select_blocks(q, k_cmp, lse, block_len=c.block_len, block_stride=c.block_stride,
                                    select_len=c.select_len, num_selected=c.num_selected, seq_len=seq_len)
        branches = [o_cmp, g_cmp, ops.selected_attention(q, k_slc, v_slc, indices, select_len=c.select_len), g_slc]
        if c.window:
            branches += [ops.attention(q, *win_kv, causal=True, window=c.window), g_win]
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
        if c.attention == "nsa":
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
        c = self.config
        lengths = step.lengths
        if c.attention == "full":
            if sdpa_backend:
                keys, values = cache["k"][:, :sdpa_length], cache["v"][:, :sdpa_length]  # values maybe padded
                return sdpa(q[:, None], keys, values, sdpa_backend)[:, 0, :, :self.dv]
            return ops.attention_decode(q, cache["k"], cache["v"], lengths)
        g_cmp, g_slc, g_win = gates[:, 0].unbind(-1)
        if "k_win" not in cache:  # one shared K/V (or no window): one kernel call
            return ops.nsa_decode(q, cache["k"], cache["v"], cache["k_cmp"], cache["v_cmp"], lengths, g_cmp, g_slc,
                                  g_win if c.window else None, **c.nsa)
        return ops.nsa_decode(q, cache["k"], cache["v"], cache["k_cmp"], cache["v_cmp"], lengths, g_cmp, g_slc, g_win,
                              **c.nsa, k_window=cache["k_win"], v_window=cache["v_win"])

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


def block_completes(config: NSAConfig, lengths: list[int]) -> bool:
    """Whether a decode step that brings some row to one of these lengths (tokens after the step) completes a
    compressed block in that row."""
    return config.attention == "nsa" and any(
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


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """PyTorch SDPA on one backend ('flash', 'cudnn', 'efficient', 'math') in our layout: q [B, T, HQ, Dk],
    k [B, S, H, Dk], v [B, S, H, Dv] -> [B, T, HQ, Dv]; causal, aligned bottom-right when T < S (query i at key
    position i + S - T: a prompt slice after cached tokens); a single query (decode) sees every key.
    GQA through enable_gqa, or the KV heads expanded where the backend refuses it: the first way that works is
    remembered per backend and kind of call (SDPA_WAYS), so the call is graph-safe after its first use. A backend
    that needs Dv == Dk gets V zero-padded by the caller (sdpa_value_width), in the cache itself."""
    T, S = q.shape[1], k.shape[1]
    causal = {"is_causal": T == S and T > 1}
    if 1 < T < S:
        causal = {"attn_mask": causal_lower_right(T, S)}

    def call(way: str):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = {"enable_gqa": True}
        if way == "expand":
            group = q.shape[2] // k.shape[2]
            kt, vt, gqa = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1), {}
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(qt, kt, vt, **causal, **gqa).transpose(1, 2)

    key = (backend, "decode" if T == 1 else "slice" if T < S else "prompt")  # a slice takes a lower-right mask
    if key in SDPA_WAYS:
        return call(SDPA_WAYS[key])
    errors = []
    for way in ("native", "expand"):
        try:
            out = call(way)
        except RuntimeError as error:
            errors.append(f"{way}: {str(error).strip().splitlines()[0][:100]}")
            continue
        SDPA_WAYS[key] = way
        return out
    raise ValueError(f"SDPA backend {backend} refuses these shapes ({'; '.join(errors)})")


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SDPA_WAYS: dict[tuple[str, str], str] = {}  # (backend, kind of call) -> the first way of calling it that worked
_VALUE_WIDTHS: dict[tuple, int] = {}


def sdpa_value_width(backend: str, dk: int, dv: int, device: torch.device, dtype: torch.dtype) -> int:
    """Dv where the backend takes V of another head dim than Q and K (tried on tiny tensors, prompt, slice and
    decode shapes), else Dk: V is then stored zero-padded to Dk (the outputs' extra columns are zeros, and dropped)."""
    key = (backend, dk, dv, str(device), dtype)
    if key not in _VALUE_WIDTHS:
        q, k, v = (torch.randn(1, 3, 2, d, device=device, dtype=dtype) for d in (dk, dk, dv))
        try:
            for T in (3, 2, 1):  # a prompt (causal), a slice after a cached token and a decode step
                sdpa(q[:, :T], k, v, backend)
            _VALUE_WIDTHS[key] = dv
        except (RuntimeError, ValueError):
            _VALUE_WIDTHS[key] = dk
        for kind in ("prompt", "slice", "decode"):  # decided again on real shapes
            SDPA_WAYS.pop((backend, kind), None)
    return _VALUE_WIDTHS[key]


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, config: NSAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = NSAAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: NSACache | None = None


class NSAForCausalLM(nn.Module):
    """The NSA transformer. Attributes a caller may set: `kernels` ('auto': Triton on CUDA tensors, the reference
    elsewhere; 'triton'; 'reference'), `sdpa_backend` (None, or 'flash' / 'cudnn' / 'efficient' / 'math' for
    attention 'full' through PyTorch SDPA: the baseline of `nsa-eval bench model`; a CUDA-graph decode step on it
    reads the number of keys of the step it captured, so generate with cuda_graphs off there), `prefill_chunk` (prompt tokens per slice over the cache, so a 64k-token
    prompt's working set is bounded by the slice; None: DEFAULT_PREFILL_CHUNK on CUDA, one pass elsewhere; 0: one
    pass),
    `decode_reserve` (cache slots allocated beyond a prompt), `cuda_graphs`."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.kernels = "auto"
        self.sdpa_backend: str | None = None
        self.prefill_chunk: int | None = None
        self.decode_reserve = 256
        self.cuda_graphs = True

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "NSAForCausalLM":
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
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def _ops(self) -> Kernels:
        if self.kernels == "auto":
            return kernels("triton" if self.device.type == "cuda" else "reference")
        return kernels(self.kernels)

    # ---- the transformers-like entry point -----------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: NSACache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, **_: Any) -> CausalLMOutput:
        """A prompt (past_key_values None): input_ids [B, T], attention_mask [B, T] (1 = token; each row's tokens
        contiguous, left or right padded) -> logits [B, T, V] (zeros at padding), or of the last logits_to_keep
        positions. A decode step: input_ids [B, 1] and the cache of the prompt -> logits [B, 1, V].
        position_ids are implied (each row from 0) and ignored."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        with torch.no_grad():
            if past_key_values is not None:
                batch = len(past_key_values.host_lengths)
                if tuple(input_ids.shape) != (batch, 1):
                    raise ValueError(f"a decode step takes one token per cached sequence ([{batch}, 1]), got "
                                     f"input_ids {tuple(input_ids.shape)}")
                return CausalLMOutput(self._decode(input_ids[:, 0], past_key_values)[:, None], past_key_values)
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
        return CausalLMOutput(logits, cache)

    # ---- prefill and decode --------------------------------------------------------------------------------

    def _prefill(self, ids: torch.Tensor, cache: NSACache | None, rows: slice) -> torch.Tensor:
        """Tokens ids [b, T] at positions 0..T-1 through every layer, in slices of `prefill_chunk` tokens over the
        cache -> last hidden states [b, T, hidden] (before the final norm); fills cache[rows] (a cache of its own
        when sliced without one)."""
        b, T = ids.shape
        step = self.prefill_chunk
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(f"prefill_chunk must be None, 0 (one pass) or a positive number of tokens, got {step!r}")
        if step is None:
            step = DEFAULT_PREFILL_CHUNK if self.device.type == "cuda" else T
        step = step or T
        if cache is None and step < T:
            cache, rows = self.new_cache(b, T), slice(None)
        hidden = [self._prefill_slice(ids[:, start:start + step], start, cache, rows) for start in range(0, T, step)]
        if cache is not None:
            cache.lengths[rows] = T
            for r in range(*rows.indices(len(cache.host_lengths))):
                cache.host_lengths[r] = T
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, 1)

    def _prefill_slice(self, ids: torch.Tensor, start: int, cache: NSACache | None, rows: slice) -> torch.Tensor:
        """Tokens ids [b, T] at positions start..start+T-1 (the cache holds the earlier ones) -> hidden [b, T, hidden]."""
        b, T = ids.shape
        c = self.config
        ops = self._ops()
        positions = torch.arange(start, start + T, device=ids.device).expand(b, T)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        h, delta = self.embed(ids), None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            normed, h = ops.add_rms_norm(h if delta is None else delta, layer.attn_norm.weight, c.rms_norm_eps,
                                         None if delta is None else h)
            delta = layer.attn.prefill(normed, cos, sin, ops, self.sdpa_backend, layer_cache, rows, start)
            normed, h = ops.add_rms_norm(delta, layer.mlp_norm.weight, c.rms_norm_eps, h)
            delta = layer.mlp(normed, ops.silu_mul)
        return h + delta

    def _decode_step(self, ids: torch.Tensor, cache: NSACache, sdpa_length: int, compress: bool) -> torch.Tensor:
        """One token per sequence, ids [B] -> logits [B, V]; advances cache.lengths on the device (graph-safe).
        compress: some row completes a compressed block with this token (block_completes)."""
        c = self.config
        ops = self._ops()
        positions = cache.lengths.long()
        lengths = cache.lengths + 1
        nsa = c.attention == "nsa"
        step = DecodeIndex(torch.arange(ids.shape[0], device=ids.device), positions, lengths,
                           positions % c.block_len if nsa else None,
                           positions % c.window if nsa and c.window else None)
        cos, sin = rope_tables(positions[:, None], c.head_dim, c.rope_theta)
        h, delta = self.embed(ids)[:, None], None
        for layer, layer_cache in zip(self.layers, cache.layers):
            normed, h = ops.add_rms_norm(h if delta is None else delta, layer.attn_norm.weight, c.rms_norm_eps,
                                         None if delta is None else h)
            delta = layer.attn.decode(normed, step, cos, sin, ops, self.sdpa_backend, layer_cache, sdpa_length,
                                      compress)
            normed, h = ops.add_rms_norm(delta, layer.mlp_norm.weight, c.rms_norm_eps, h)
            delta = layer.mlp(normed, ops.silu_mul)
        cache.lengths.copy_(lengths)
        normed, _ = ops.add_rms_norm(delta, self.norm.weight, c.rms_norm_eps, h)
        return self.lm_head(normed)[:, 0]

    def _decode(self, ids: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """A decode step, replayed on CUDA from one of two CUDA graphs (with or without making a compressed block:
        phi runs only on the steps where some row completes one) after its first (eager) call."""
        self.grow_cache(cache, max(cache.host_lengths) + 1)
        sdpa_length = max(cache.host_lengths) + 1  # SDPA (the baseline) reads this many keys; frozen in a graph
        compress = block_completes(self.config, [n + 1 for n in cache.host_lengths])
        graph, logits = cache.graphs.get(compress, (None, None))
        if ids.device.type != "cuda" or not self.cuda_graphs or graph == "off":
            logits = self._decode_step(ids, cache, sdpa_length, compress)
        elif graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # this token's step, eager: also compiles the kernels before capture
                logits = self._decode_step(ids, cache, sdpa_length, compress)
            torch.cuda.current_stream().wait_stream(stream)
            if cache.graph_ids is None:
                cache.graph_ids = ids.clone()
            graph = torch.cuda.CUDAGraph()  # capture records the step's kernels without running them
            try:
                with torch.cuda.graph(graph):
                    graph_logits = self._decode_step(cache.graph_ids, cache, sdpa_length, compress)
                cache.graphs[compress] = (graph, graph_logits)
            except RuntimeError as error:  # leave this cache eager rather than fail the generation
                import warnings

                warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {error}")
                cache.graphs[compress] = ("off", None)
        else:
            cache.graph_ids.copy_(ids)
            graph.replay()
            logits = logits.clone()
        cache.host_lengths = [n + 1 for n in cache.host_lengths]
        return logits

    # ---- cache ---------------------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> NSACache:
        """An empty cache for `batch` sequences of up to `capacity` tokens (grown on demand)."""
        c = self.config
        capacity = max(capacity, c.block_len)
        kw = dict(device=self.device, dtype=self.dtype)
        H, dk, dv = c.num_key_value_heads, c.head_dim, c.v_head_dim
        # SDPA backends that need Dv == Dk read V zero-padded from the cache (no copy per step)
        v_width = sdpa_value_width(self.sdpa_backend, dk, dv, self.device, self.dtype) \
            if c.attention == "full" and self.sdpa_backend else dv
        layers = []
        for _ in range(c.num_hidden_layers):
            layer = {"k": torch.zeros(batch, capacity, H, dk, **kw),
                     "v": torch.zeros(batch, capacity, H, v_width, **kw)}
            if c.attention == "nsa":
                blocks = (capacity - c.block_len) // c.block_stride + 1
                layer.update(k_cmp=torch.zeros(batch, blocks, H, dk, **kw),
                             v_cmp=torch.zeros(batch, blocks, H, dv, **kw),
                             k_ring=torch.zeros(batch, c.block_len, H, dk, **kw),
                             v_ring=torch.zeros(batch, c.block_len, H, dv, **kw))
                if c.window and not c.shared_kv:
                    layer.update(k_win=torch.zeros(batch, c.window, H, dk, **kw),
                                 v_win=torch.zeros(batch, c.window, H, dv, **kw))
            layers.append(layer)
        return NSACache(layers, torch.zeros(batch, dtype=torch.int32, device=self.device), capacity)

    def grow_cache(self, cache: NSACache, needed: int) -> None:
        """Make room for `needed` tokens per sequence (a new allocation drops the cache's CUDA graphs)."""
        if needed <= cache.capacity:
            return
        c = self.config
        capacity = needed + self.decode_reserve
        blocks = (capacity - c.block_len) // c.block_stride + 1
        for layer in cache.layers:
            for key, size in [(k, capacity) for k in SEQUENCE_KEYS] + [(k, blocks) for k in BLOCK_KEYS if k in layer]:
                old = layer[key]
                layer[key] = old.new_zeros(old.shape[0], size, *old.shape[2:])
                layer[key][:, :old.shape[1]] = old
        cache.capacity = capacity
        cache.drop_graphs()

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """config.json (every hyperparameter) and model.safetensors into `path` (a tokenizer goes beside them)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # copies: the attention's and MLP's input weights are row slices of one tensor (fused_linear)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "NSAForCausalLM":
        """Our checkpoint or flash-linear-attention's; ModelLoadError (one line) for anything that does not fit."""
        path = Path(path)
        config, state = read_checkpoint(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
            state.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}"
                             f"{', ...' if len(unexpected) > 3 else ''})")
            raise ModelLoadError(f"weights in {path} do not fit its config.json: {'; '.join(parts)}")
        for name, shape in expected.items():
            if tuple(state[name].shape) != tuple(shape):
                raise ModelLoadError(f"weights in {path}: {name} has shape {tuple(state[name].shape)} but config.json "
                                     f"implies {tuple(shape)}")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
        return model.to(device)


def read_checkpoint(path: Path) -> tuple[NSAConfig, dict[str, torch.Tensor]]:
    """config.json and the weights (safetensors, sharded safetensors, or pytorch_model.bin) of a checkpoint folder,
    names mapped to ours. ModelLoadError with one line naming what is wrong."""
    if not path.is_dir():
        raise ModelLoadError(f"NSA checkpoint folder {path} does not exist; give a folder with config.json and weights")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; NSAForCausalLM.save_pretrained writes one")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object")
    model_type = data.get("model_type")
    try:
        if model_type == MODEL_TYPE:
            config = NSAConfig.from_dict(data, where=str(config_file))
        elif model_type == FLA_MODEL_TYPE:
            config = config_from_fla(data, where=str(config_file))
        else:
            raise ModelLoadError(
                f"{config_file} has model_type {model_type!r}, not an NSA checkpoint ('{MODEL_TYPE}', or 'nsa' for "
                f"flash-linear-attention); a full-attention checkpoint loads with hf:{path}")
        config.validate(str(config_file))
    except TypeError as error:
        raise ModelLoadError(f"{config_file}: {error}") from None
    except ModelLoadError:
        raise
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    state = _read_weights(path)
    if model_type == FLA_MODEL_TYPE:
        mapped = {}
        for name, tensor in state.items():
            ours = fla_name(name)
            if ours is None:
                raise ModelLoadError(f"{path}: flash-linear-attention weight {name} has no counterpart in our model "
                                     "(FLA_NAME_MAP in model_adapters/nsa_model.py)")
            mapped[ours] = tensor
        state = mapped
    return config, state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / f"{WEIGHTS_FILE}.index.json"
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({error})") from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as error:  # pickle and zip errors of many kinds: the user needs one line
            raise ModelLoadError(f"could not read {path / 'pytorch_model.bin'}: {str(error).splitlines()[0]}") from None
    else:
        raise ModelLoadError(f"{path} has no weights ({WEIGHTS_FILE}); NSAForCausalLM.save_pretrained writes them")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(f"could not read weights {file}: {str(error).splitlines()[0]}") from None
    return state


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
