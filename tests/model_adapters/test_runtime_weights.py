"""The runtime's map of Llama-family transformers checkpoints (runtime/weights.py: HF_NAME_MAP through our_name, config_from_hf) and its
RoPE (runtime/rope.py), checked against tiny transformers models saved with save_pretrained and against
transformers' own RoPE functions (CPU, a few seconds)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from nsa_eval.model_adapters.runtime.rope import inv_frequencies, rope_tables
from nsa_eval.model_adapters.runtime.weights import HF_MODEL_TYPES, HF_NAME_MAP, config_from_hf, our_name

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
YARN_TUNED = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 16,
              "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False}
YARN_ATTENTION = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                  "attention_factor": 1.25}
LINEAR = {"rope_type": "linear", "factor": 4.0}

# name: (config class, model class, config kwargs beyond TINY, what our config must say)
CASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}, {}),
    "llama-llama3": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=dict(LLAMA3, rope_theta=500000.0),
                                                         max_position_embeddings=2048),
                     dict(rope_type="llama3", rope_theta=500000.0)),
    "llama-linear": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LINEAR), dict(rope_type="linear")),
    "llama-yarn": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=YARN, max_position_embeddings=2048),
                   dict(rope_type="yarn")),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True), dict(tie_word_embeddings=True)),
    "llama-bias": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True), dict(qkv_bias=True, o_bias=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              dict(qkv_bias=True, rope_theta=1e6)),
    "qwen2-window": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=32,
                                                         max_window_layers=0), dict(qkv_bias=True, sliding_window=32)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32), dict(qk_norm=True)),
    "qwen3-yarn-bias": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, attention_bias=True, rope_parameters=YARN,
                                                            max_position_embeddings=2048),
                        dict(qk_norm=True, qkv_bias=True, o_bias=True, rope_type="yarn")),
    "mistral-window": (MistralConfig, MistralForCausalLM, dict(sliding_window=32), dict(sliding_window=32)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None), {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(case name, transformers model, its config.json as a dict, its saved tensor names)."""
    config_cls, model_cls, kwargs, _ = CASES[request.param]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **kwargs))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    return request.param, model, json.loads((path / "config.json").read_text()), stored


def expected_names(layers: int, tied: bool, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> set[str]:
    """Our model's parameter names, written out by hand."""
    names = {"embed.weight", "norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(layers):
        p = f"layers.{i}."
        names |= {p + "attn_norm.weight", p + "mlp_norm.weight"}
        names |= {p + f"attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + f"attn.{x}_proj.bias" for x in "qkv"} if qkv_bias else set()
        names |= {p + "attn.o_proj.bias"} if o_bias else set()
        names |= {p + "attn.q_norm.weight", p + "attn.k_norm.weight"} if qk_norm else set()
    return names


def test_config_from_hf(saved):
    name, model, data, _ = saved
    want = dict(rope_type=None, rope_theta=10000.0, qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=None,
                tie_word_embeddings=False) | CASES[name][3]
    hf = model.config
    c = config_from_hf(data, where=name)
    assert c.attention == "full"
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == \
        (128, 64, 2, 4, 2)
    hf_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads  # as modeling_*.py
    assert c.head_dim == c.v_head_dim == hf_head_dim == CASES[name][2].get("head_dim", 16)
    assert c.intermediate_size == 128 and c.max_position_embeddings == hf.max_position_embeddings
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert c.rope_theta == want["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert (c.rope_scaling or {}).get("rope_type") == want["rope_type"]
    if c.rope_scaling is not None:  # everything transformers keeps but rope_theta
        assert c.rope_scaling == {k: v for k, v in hf.rope_parameters.items() if k != "rope_theta"}
    for field in ("qkv_bias", "o_bias", "qk_norm", "sliding_window", "tie_word_embeddings"):
        assert getattr(c, field) == want[field], field


def test_every_weight_maps(saved):
    name, model, data, stored = saved
    c = config_from_hf(data, where=name)
    want = dict(qkv_bias=False, o_bias=False, qk_norm=False, tie_word_embeddings=False) | CASES[name][3]
    expected = expected_names(2, want["tie_word_embeddings"], want["qkv_bias"], want["o_bias"], want["qk_norm"])
    state = model.state_dict()
    ours = {n: our_name(n, HF_NAME_MAP) for n in state}
    assert None not in ours.values(), [n for n, o in ours.items() if o is None]
    # a tied model's state_dict also names lm_head.weight (the embedding again); its checkpoint does not
    assert set(ours.values()) == expected | ({"lm_head.weight"} if want["tie_word_embeddings"] else set())
    assert {our_name(n, HF_NAME_MAP) for n in stored} == expected
    hd, q, kv, h = c.head_dim, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size
    shapes = {"embed.weight": (c.vocab_size, h), "lm_head.weight": (c.vocab_size, h), "norm.weight": (h,),
              "attn.q_proj.weight": (q, h), "attn.k_proj.weight": (kv, h), "attn.v_proj.weight": (kv, h),
              "attn.o_proj.weight": (h, q), "attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,),
              "attn.v_proj.bias": (kv,), "attn.o_proj.bias": (h,), "attn.q_norm.weight": (hd,),
              "attn.k_norm.weight": (hd,), "attn_norm.weight": (h,), "mlp_norm.weight": (h,),
              "mlp.gate_proj.weight": (c.intermediate_size, h), "mlp.up_proj.weight": (c.intermediate_size, h),
              "mlp.down_proj.weight": (h, c.intermediate_size)}
    for hf, our in ours.items():
        key = our.split(".", 2)[2] if our.startswith("layers.") else our
        assert tuple(state[hf].shape) == shapes[key], (hf, our)


def test_buffers_map_to_none():
    assert our_name("model.rotary_emb.inv_freq", HF_NAME_MAP) is None
    assert our_name("model.layers.0.self_attn.rotary_emb.inv_freq", HF_NAME_MAP) is None
    assert our_name("model.layers.3.self_attn.k_norm.weight", HF_NAME_MAP) == "layers.3.attn.k_norm.weight"


ROPE_CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "linear": dict(rope_parameters=LINEAR),
    "llama3": dict(rope_parameters=LLAMA3, max_position_embeddings=2048),
    "yarn": dict(rope_parameters=YARN, max_position_embeddings=2048),
    "yarn-tuned": dict(rope_parameters=YARN_TUNED, max_position_embeddings=2048),
    "yarn-attention-factor": dict(rope_parameters=YARN_ATTENTION, max_position_embeddings=2048),
    "yarn-no-factor": dict(rope_parameters=dict(YARN, factor=None), max_position_embeddings=2048),
    "yarn-head-128": dict(rope_parameters=YARN, max_position_embeddings=2048, head_dim=128),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inv_frequencies_match_transformers(case, tmp_path):
    hf = LlamaConfig(**TINY, **ROPE_CASES[case])
    hf.save_pretrained(tmp_path)
    c = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    ours, scaling = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        theirs, their_scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        theirs, their_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    assert ours.dtype == torch.float32 and ours.shape == (c.head_dim // 2,)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0)
    assert scaling == pytest.approx(their_scaling, rel=1e-12)
    if case.startswith("yarn") and case != "yarn-attention-factor":
        assert scaling > 1.0
    if case != "default":  # the scaling changed something
        default, _ = inv_frequencies(c.head_dim, c.rope_theta, None, c.max_position_embeddings)
        assert not torch.equal(ours, default)


@pytest.mark.parametrize("case", ["yarn", "llama3", "yarn-tuned"])
def test_rope_tables_match_transformers(case):
    hf = LlamaConfig(**TINY, **ROPE_CASES[case])
    rotary = LlamaRotaryEmbedding(hf)
    positions = torch.tensor([[0, 1, 2, 7, 100, 511, 512, 2047], [5, 6, 300, 301, 1000, 1500, 1999, 2000]])
    c = config_from_hf(hf.to_dict())
    inv_freq, scaling = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
    cos, sin = rope_tables(positions.to(torch.int32), inv_freq, scaling)
    assert cos.shape == sin.shape == (2, 8, 1, c.head_dim // 2) and cos.dtype == sin.dtype == torch.float32
    x = torch.randn(2, 8, c.head_dim)
    their_cos, their_sin = rotary(x, positions)
    half = c.head_dim // 2
    torch.testing.assert_close(their_cos[..., half:], their_cos[..., :half], rtol=0, atol=0)
    torch.testing.assert_close(cos[:, :, 0], their_cos[..., :half], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[:, :, 0], their_sin[..., :half], rtol=1e-6, atol=1e-6)
    # rotate-half: dim i pairs with dim i + head_dim/2, as apply_rotary_pos_emb
    q = torch.randn(2, 3, 8, c.head_dim)  # [B, heads, T, head_dim]
    want, _ = apply_rotary_pos_emb(q, q, their_cos, their_sin)
    c_, s_ = cos[:, None, :, 0], sin[:, None, :, 0]
    q1, q2 = q[..., :half], q[..., half:]
    torch.testing.assert_close(torch.cat([q1 * c_ - q2 * s_, q2 * c_ + q1 * s_], -1), want, rtol=1e-5, atol=1e-5)


def test_transformers_4_layout():
    """config.json files written by transformers 4.x: top-level rope_theta, rope_scaling (old key "type")."""
    llama31 = dict(model_type="llama", **TINY, rope_theta=500000.0, max_position_embeddings=131072,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    c = config_from_hf(llama31)
    assert c.rope_theta == 500000.0 and c.rope_scaling == dict(llama31["rope_scaling"])
    assert c.eos_token_id == [128001, 128008, 128009] and c.tie_word_embeddings
    old_linear = dict(llama31, rope_scaling={"type": "linear", "factor": 2.0})
    assert config_from_hf(old_linear).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # Qwen2.5: the window is off (use_sliding_window false) whatever sliding_window says
    qwen25 = dict(model_type="qwen2", **TINY, rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
                  sliding_window=32768, max_window_layers=28)
    c = config_from_hf(qwen25)
    assert c.sliding_window is None and c.rope_scaling is None and c.rope_theta == 1e6 and c.qkv_bias
    assert not c.o_bias and c.bos_token_id is None
    # transformers reads the same config
    for data in (llama31, old_linear, qwen25):
        hf = AutoConfig.for_model(**data)
        ours = config_from_hf(data)
        assert hf.rope_parameters["rope_theta"] == ours.rope_theta
        assert ours.rope_scaling in (None, {k: v for k, v in hf.rope_parameters.items()
                                            if k not in ("rope_theta", "type")})


def test_missing_keys_take_transformers_defaults():
    bare = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    for model_type in HF_MODEL_TYPES:
        data = dict(bare, model_type=model_type)
        ours, hf = config_from_hf(data), AutoConfig.for_model(**data)
        assert ours.head_dim == (getattr(hf, "head_dim", None) or 16), model_type  # qwen3: 128, others 64 // 4
        assert ours.max_position_embeddings == hf.max_position_embeddings, model_type
        assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id), model_type
        assert ours.sliding_window == getattr(hf, "sliding_window", None), model_type  # mistral: 4096
        assert ours.rope_theta == hf.rope_parameters["rope_theta"] and ours.rope_scaling is None


def _llama(**changes) -> dict:
    return dict(model_type="llama", **TINY) | changes


@pytest.mark.parametrize("data", [
    _llama(hidden_act="gelu"),
    _llama(mlp_bias=True),
    _llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    _llama(rope_scaling={"type": "dynamic", "factor": 2.0}),
    _llama(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                            "original_max_position_embeddings": 1024, "rope_theta": 10000.0}),
    _llama(partial_rotary_factor=0.5),
    _llama(model_type="gemma2"),
    _llama(model_type="qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=1),
    _llama(model_type="qwen3", use_sliding_window=True, sliding_window=32,
           layer_types=["full_attention", "sliding_attention"]),
], ids=["gelu", "mlp-bias", "dynamic", "dynamic-old-layout", "longrope", "partial-rotary", "gemma2",
        "qwen2-window-some-layers", "qwen3-layer-types"])
def test_unsupported_configs_name_the_fallback(data):
    with pytest.raises(ValueError, match="--engine transformers") as error:
        config_from_hf(data, where="x/config.json")
    assert "\n" not in str(error.value) and str(error.value).startswith("x/config.json")


def test_model_type_error_lists_the_supported():
    with pytest.raises(ValueError, match="llama, qwen2, qwen3, mistral"):
        config_from_hf(_llama(model_type="phi3"))


def test_inv_frequencies_refuses_other_types():
    with pytest.raises(ValueError, match="--engine transformers"):
        inv_frequencies(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 2048)
