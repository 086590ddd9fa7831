"""Explicit weight-name and config maps from other checkpoint layouts onto the runtime's model (gpt-fast style).

Our own checkpoints (model_type nsa_eval) use the model's names as they are. flash-linear-attention's NSA
checkpoints (model_type nsa) map through FLA_NAME_MAP and config_from_fla, and back (runtime/checkpoint.py: save_fla)
through FLA_EXPORT_MAP and fla_config_from.
"""

from __future__ import annotations

import re
from typing import Any

from nsa_eval.model_adapters.runtime.config import ModelConfig

FLA_MODEL_TYPE = "nsa"


# fla's parameter names (fla/models/nsa/modeling_nsa.py, fla/layers/nsa.py) and ours, one pair a line:
# {layer} is a layer index, {a|b} one of the choices; both sides hold the same placeholders in the same order
FLA_NAMES: list[tuple[str, str]] = [
    ("model.embeddings.weight", "embed.weight"),
    ("model.layers.{layer}.attn_norm.weight", "layers.{layer}.attn_norm.weight"),
    ("model.layers.{layer}.attn.{q|k|v|g|o}_proj.{weight|bias}", "layers.{layer}.attn.{q|k|v|g|o}_proj.{weight|bias}"),
    ("model.layers.{layer}.mlp_norm.weight", "layers.{layer}.mlp_norm.weight"),
    ("model.layers.{layer}.mlp.{gate|up|down}_proj.weight", "layers.{layer}.mlp.{gate|up|down}_proj.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def name_map(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Name templates (source, target) -> (regex of the source, its replacement) pairs for `our_name`: each
    placeholder becomes a group of the regex ({layer}: digits; {a|b}: the choices) and \\k in the replacement."""
    def parts(template: str) -> list[str]:
        return re.split(r"(\{[^}]*\})", template)  # literal text and placeholders, alternately

    def pattern(template: str) -> str:
        return "".join(r"(\d+)" if p == "{layer}" else f"({p[1:-1]})" if p.startswith("{") else re.escape(p)
                       for p in parts(template))

    def replacement(template: str) -> str:
        groups = iter(range(1, template.count("{") + 1))
        return "".join(f"\\{next(groups)}" if p.startswith("{") else p for p in parts(template))

    return [(pattern(source), replacement(target)) for source, target in pairs]


FLA_NAME_MAP = name_map(FLA_NAMES)  # fla's names -> ours (loading fla checkpoints)
FLA_EXPORT_MAP = name_map([(ours, fla) for fla, ours in FLA_NAMES])  # ours -> fla's (save_fla)


def our_name(name: str, name_map: list[tuple[str, str]]) -> str | None:
    """The name `name` takes through one of the maps here: ours for a checkpoint's name through FLA_NAME_MAP or
    HF_NAME_MAP, fla's for ours through FLA_EXPORT_MAP; None for a name the map does not know (buffers such as
    rotary_emb.inv_freq)."""
    for pattern, target in name_map:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def config_from_fla(data: dict[str, Any], where: str = "config") -> ModelConfig:
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
    return ModelConfig(
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


def fla_config_from(config: ModelConfig, where: str = "config") -> dict[str, Any]:
    """flash-linear-attention's NSA config.json (fla.models.NSAConfig's fields, model_type nsa) for our config: the
    reverse of config_from_fla. ValueError of one line listing everything fla's layout cannot hold (its NSA is
    l = d = l' = block_size, mean pooling, one K/V shared by the branches, q/k/v biases only, plain RoPE, equal
    query-key and value head dims). fuse_norm / fuse_swiglu / fuse_cross_entropy are written false: fla's PyTorch
    paths (the same math) run on any device, its fused Triton kernels only on a GPU; set them true there to train."""
    c = config
    problems = []
    if c.attention != "nsa":  # the NSA fields below mean nothing then
        problems.append(f"attention {c.attention!r} (fla's model_type nsa is NSA attention)")
    else:
        if c.compression != "mean":
            problems.append(f"compression {c.compression!r} (fla mean-pools each block)")
        if not c.shared_kv:
            problems.append("shared_kv false (fla has one K/V for every branch)")
        if not c.block_len == c.block_stride == c.select_len:
            problems.append(f"block_len={c.block_len}, block_stride={c.block_stride}, select_len={c.select_len} (fla "
                            "has one block_size for all three)")
    if c.v_head_dim != c.head_dim:
        problems.append(f"v_head_dim={c.v_head_dim} != head_dim={c.head_dim} (fla has one head_dim)")
    if c.qk_norm:
        problems.append("qk_norm (fla has no q/k norm)")
    if c.o_bias:
        problems.append("o_bias (fla's o_proj has no bias)")
    if c.rope_scaling is not None:
        problems.append(f"rope_scaling {c.rope_scaling.get('rope_type')!r} (fla's RoPE has no scaling)")
    if c.sliding_window is not None:
        problems.append(f"sliding_window={c.sliding_window} (fla's NSA has no full-attention window)")
    if problems:
        raise ValueError(f"{where} cannot be written in flash-linear-attention's NSA layout: {'; '.join(problems)}")
    return {
        "model_type": FLA_MODEL_TYPE, "architectures": ["NSAForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "qkv_bias": c.qkv_bias, "block_size": c.block_len, "block_counts": c.num_selected, "window_size": c.window,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "hidden_ratio": 4, "intermediate_size": c.intermediate_size, "hidden_act": "swish",
        "elementwise_affine": True, "norm_eps": c.rms_norm_eps, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False, "fuse_linear_cross_entropy": False,
        "use_l2warp": False, "attnres_block_size": None,
    }


def fla_kernel_limits(config: ModelConfig) -> list[str]:
    """What fla 0.6.0's own NSA ops (parallel_nsa on a GPU, naive_nsa) need beyond what its layout holds: the
    checkpoint loads in fla whatever this says, but a forward pass stops at the op where one is not met."""
    group = config.num_attention_heads // config.num_key_value_heads
    limits = []
    if group < 16 or group & (group - 1):
        limits.append(f"{group} query heads per KV head: fla's parallel_nsa and naive_nsa assert a power of 2 >= 16")
    if config.head_dim > 128:
        limits.append(f"head_dim={config.head_dim}: fla's NSA kernels take at most 256 on Hopper cards, 128 elsewhere")
    if config.window:
        limits.append(f"window_size={config.window}: fla's window branch calls flash-attn (pip install flash-attn)")
    return limits


# Llama-family transformers checkpoints (SmolLM2 is model_type llama) -------------------------------------------------

HF_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

# transformers' parameter names (models/{llama,qwen2,qwen3,mistral}/modeling_*.py) -> ours. Buffers such as
# rotary_emb.inv_freq (in old checkpoints) map to None; the caller skips them.
HF_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", r"embed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight"),
    (r"model\.norm\.weight", r"norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]

# transformers' class defaults (configuration_*.py, 5.x) for keys a config.json may lack
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
    "qwen3": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, head_dim=128),
    "mistral": dict(max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, sliding_window=4096),
}



def _unsupported(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what} is not supported by the runtime engine; use --engine transformers")


def _hf_rope(data: dict[str, Any], max_positions: int, where: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the normalised rope_scaling ({"rope_type": ..., ...}; None for default RoPE) of a config.json
    in either layout: transformers < 5 (top-level rope_theta, rope_scaling) or 5.x (rope_parameters holding both)."""
    from nsa_eval.model_adapters.runtime.rope import ROPE_TYPES

    params = dict(data.get("rope_scaling") or data.get("rope_parameters") or {})
    nested = [v for v in params.values() if isinstance(v, dict)]  # per layer type (full_attention, ...)
    if nested:
        if any(v != nested[0] for v in nested):
            raise _unsupported(where, "a different RoPE per layer type (rope_parameters)")
        params = dict(nested[0])
    theta = params.pop("rope_theta", None) or data.get("rope_theta") or 10000.0
    partial = params.pop("partial_rotary_factor", None) or data.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise _unsupported(where, f"partial_rotary_factor={partial!r}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise _unsupported(where, f"rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
    missing = [key for key in required[rope_type] if params.get(key) is None]
    if missing:
        raise ValueError(f"{where}: rope type {rope_type!r} lacks {', '.join(missing)} in rope_scaling / "
                         "rope_parameters")
    if rope_type in ("llama3", "yarn"):  # as transformers' standardize_rope_params: a top-level value wins
        params["original_max_position_embeddings"] = (data.get("original_max_position_embeddings")
                                                      or params.get("original_max_position_embeddings")
                                                      or max_positions)
    return float(theta), {"rope_type": rope_type, **params}


def _hf_sliding_window(data: dict[str, Any], model_type: str, layers: int, where: str) -> int | None:
    """The one window of every layer, or None (full attention); a window on only some layers is refused."""
    if model_type == "mistral":  # MistralAttention: config.sliding_window on every layer
        return data.get("sliding_window", _HF_DEFAULTS["mistral"]["sliding_window"])
    if model_type in ("qwen2", "qwen3") and data.get("use_sliding_window"):
        window = data.get("sliding_window", 4096)
        if window is None:
            return None
        kinds = data.get("layer_types") or ["sliding_attention" if i >= data.get("max_window_layers", 28)
                                            else "full_attention" for i in range(layers)]
        if all(kind == "sliding_attention" for kind in kinds):
            return window
        if all(kind == "full_attention" for kind in kinds):
            return None
        raise _unsupported(where, f"a sliding window on some layers only (use_sliding_window with "
                                  f"max_window_layers={data.get('max_window_layers', 28)} of {layers})")
    return None


def config_from_hf(data: dict[str, Any], where: str = "config") -> ModelConfig:
    """Our config (attention "full") for a transformers Llama, Qwen2, Qwen3 or Mistral config.json; transformers'
    class defaults where a key is missing."""
    model_type = data.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported by the runtime engine (only "
                         f"{', '.join(HF_MODEL_TYPES)}); use --engine transformers")
    if data.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _unsupported(where, f"hidden_act={data['hidden_act']!r} (only silu)")
    if data.get("mlp_bias"):
        raise _unsupported(where, "mlp_bias=true")
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if data.get(key) is None]
    if missing:
        raise ValueError(f"{where} (model_type {model_type}) lacks {', '.join(missing)}")
    defaults = _HF_DEFAULTS[model_type]
    hidden, heads, layers = data["hidden_size"], data["num_attention_heads"], data["num_hidden_layers"]
    head_dim = data["head_dim"] if "head_dim" in data else defaults.get("head_dim")
    head_dim = head_dim or hidden // heads
    max_positions = data.get("max_position_embeddings") or defaults["max_position_embeddings"]
    theta, rope_scaling = _hf_rope(data, max_positions, where)
    attention_bias = bool(data.get("attention_bias", False))
    qkv_bias, o_bias = {"llama": (attention_bias, attention_bias), "qwen2": (True, False),
                        "qwen3": (attention_bias, attention_bias), "mistral": (False, False)}[model_type]
    return ModelConfig(
        vocab_size=data["vocab_size"], hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=data.get("num_key_value_heads") or heads, head_dim=head_dim, v_head_dim=head_dim,
        intermediate_size=data["intermediate_size"], max_position_embeddings=max_positions, attention="full",
        rope_theta=theta, rope_scaling=rope_scaling, rms_norm_eps=data.get("rms_norm_eps") or 1e-6,
        qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=model_type == "qwen3",
        sliding_window=_hf_sliding_window(data, model_type, layers, where),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        bos_token_id=data.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_id=data.get("eos_token_id", defaults["eos_token_id"]), pad_token_id=data.get("pad_token_id"),
    )
