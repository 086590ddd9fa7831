"""The one description of a decoder the runtime builds: its shape, RoPE, and the attention kind with its knobs.

attention: "full" (causal GQA, optionally a sliding window), "nsa" (the paper's three gated branches; the NSA fields)
or "sparse" (training-free NSA-style block selection over a full-attention checkpoint; `sparse`, SparseSettings).
Our checkpoints store every field in config.json (`model_type: nsa_eval`); flash-linear-attention's NSA configs and
Llama-family transformers configs map onto it in runtime/weights.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsa_eval.kernels.nsa.layout import NSALayout

MODEL_TYPE = "nsa_eval"
ATTENTION_KINDS = ("full", "nsa", "sparse")
SELECTIONS = ("query", "tile")  # SparseSettings.selection


@dataclass(frozen=True)
class SparseSettings:
    """Training-free sparse attention: per query, the `leading` first tokens, the `local` last tokens and the most
    important other blocks of `block` tokens, `budget` tokens in all (the paper's 2560 = 128 + 512 + selected).
    selection: "query" ranks the blocks for each query; "tile" once for each tile of `block` consecutive queries
    (aligned to positions), from their summed importance, as NSA's kernels share a selection across a query tile
    (prefill only; a decode step is one query either way)."""

    budget: int = 2560
    leading: int = 128
    local: int = 512
    block: int = 64
    selection: str = "query"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"--sparse-selection {self.selection!r}: give one of {', '.join(SELECTIONS)}")
        for name in ("budget", "leading", "local", "block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--sparse-{name} must be a positive integer, got {value!r}")
        if self.local <= self.block:
            raise ValueError(f"--sparse-local {self.local} must exceed --sparse-block {self.block} (the local tokens "
                             "cover the current block and the one before it)")
        forced = self.leading_blocks + self.local_blocks
        if self.num_blocks < forced:
            raise ValueError(f"--sparse-budget {self.budget} tokens hold {self.num_blocks} block{'s' if self.num_blocks != 1 else ''} of {self.block} "
                             f"tokens, fewer than the {forced} blocks ({forced * self.block} tokens) that the leading "
                             f"and local tokens may take; raise it to at least {forced * self.block} tokens")

    def record(self) -> dict[str, int | str]:
        """The settings as runs record them: `selection` only when not the default, so runs made before it existed
        keep their config hash and resume."""
        recorded = asdict(self)
        if self.selection == "query":
            del recorded["selection"]
        return recorded

    @property
    def num_blocks(self) -> int:
        """Blocks per query (n)."""
        return self.budget // self.block

    @property
    def layout(self) -> NSALayout:
        """The NSA kernels' hyperparameters of this rule: l = d = l' = block, n = num_blocks, no window."""
        from nsa_eval.kernels.nsa.layout import NSALayout  # importing the kernels loads torch and triton

        return NSALayout(self.block, self.block, self.block, self.num_blocks, 0)

    @property
    def leading_blocks(self) -> int:
        return math.ceil(self.leading / self.block)

    @property
    def local_blocks(self) -> int:
        """At most this many blocks cover the last `local` tokens (the current, partial, block included)."""
        return math.ceil(self.local / self.block) + 1


@dataclass
class ModelConfig:
    """Every hyperparameter of the model; our config.json holds all of them (model_type nsa_eval).

    head_dim / v_head_dim: query-key and value head dims (the NSA paper: 192 / 128). NSA: block_len l, block_stride d
    (compression), select_len l', num_selected n, window w (0: no window branch), compression "mlp" | "mean",
    compress_hidden_size (width of phi's MLP), shared_kv. rope_scaling: None or a transformers-style dict
    ({"rope_type": "linear" | "llama3" | "yarn", "factor": ...}; runtime/rope.py). qkv_bias / o_bias: biases of the
    q, k, v and of the output projection; qk_norm: RMSNorm of each query and key head before RoPE (Qwen3);
    sliding_window: full attention over the last this many tokens only (Mistral). sparse: the settings of attention
    "sparse" (None otherwise); its block fields are then derived: l = d = l' = sparse.block, n = its blocks, no
    window, mean pooling of the one shared K/V. `layout`: the five NSA fields as the kernels take them (NSALayout,
    kernels/nsa/layout.py, which checks them); config.json keeps them flat.
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
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sparse: SparseSettings | None = None
    model_type: str = field(default=MODEL_TYPE, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.sparse, dict):
            self.sparse = SparseSettings(**self.sparse)
        if self.attention == "sparse":  # NSA's selection branch over the one K/V: its block fields follow
            self.sparse = self.sparse or SparseSettings()
            b = self.sparse.block
            self.block_len = self.block_stride = self.select_len = b
            self.num_selected, self.window, self.compression, self.shared_kv = self.sparse.num_blocks, 0, "mean", True
        self.validate()

    def validate(self, where: str = "config") -> None:
        """ValueError naming the field and the fix for a config the model cannot be built from."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{where}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{where}: attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.compression not in ("mlp", "mean"):
            raise ValueError(f"{where}: compression must be 'mlp' or 'mean', got {self.compression!r}")
        try:  # NSALayout checks the five NSA fields
            _ = self.layout
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if self.compress_hidden_size < 1:
            raise ValueError(f"{where}: compress_hidden_size must be >= 1, got {self.compress_hidden_size}")
        if self.attention == "sparse" and self.head_dim != self.v_head_dim:
            raise ValueError(f"{where}: attention 'sparse' needs head_dim == v_head_dim")
        if self.sliding_window is not None and self.attention != "full":
            raise ValueError(f"{where}: a sliding window (sliding_window={self.sliding_window}) runs with attention "
                             "'full' only; use --attention full")

    @property
    def layout(self) -> NSALayout:
        """The NSA kernels' hyperparameters, from the five fields config.json keeps flat (attention "sparse": l = d =
        l' = its block, n its blocks, no window); made (and checked) on each access."""
        from nsa_eval.kernels.nsa.layout import NSALayout  # importing the kernels loads torch and triton

        return NSALayout(self.block_len, self.block_stride, self.select_len, self.num_selected, self.window)

    @property
    def compressed(self) -> bool:
        """Whether the attention keeps compressed blocks in its cache (NSA, and the block means of sparse)."""
        return self.attention in ("nsa", "sparse")

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "model_type"
                and not (k in ("rope_scaling", "sliding_window", "sparse") and v is None)}
        return {"model_type": MODEL_TYPE, "architectures": ["NSAForCausalLM"], **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "ModelConfig":
        """Our config.json: the sizes, `attention`, and (for NSA) every NSA hyperparameter must be present."""
        required = list(REQUIRED_FIELDS) + (list(NSA_FIELDS) if data.get("attention") == "nsa" else [])
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; an nsa_eval checkpoint's config.json names every "
                             f"hyperparameter (save_pretrained writes them)")
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in known})


REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings", "attention")
NSA_FIELDS = ("block_len", "block_stride", "select_len", "num_selected", "window", "compression",
              "compress_hidden_size", "shared_kv")
