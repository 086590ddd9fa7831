"""Export to flash-linear-attention's NSA layout (runtime/checkpoint.py: save_fla, export_fla; runtime/weights.py:
FLA_EXPORT_MAP, fla_config_from) and `nsa-eval export`. A tiny random model of the SmolLM2 retrofit's kind (one K/V
shared by the branches, mean pooling, l = d = l', 3 query heads per KV head, tied embeddings, RoPE theta 1e5) written
by us is loaded by fla's own NSAForCausalLM on the CPU (tests/interop_helpers.py: run_fla_on_cpu) and by our loader:
the same logits on real text as our runtime's."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from interop_helpers import fla_nsa_on_cpu, run_fla_on_cpu
from nsa_eval.model_adapters.native import load_native
from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained, read_checkpoint, save_fla, save_pretrained
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer
from nsa_eval.model_adapters.runtime.weights import (FLA_EXPORT_MAP, FLA_NAME_MAP, config_from_fla, fla_config_from,
                                                     fla_kernel_limits, our_name)

# Charles Dickens, A Tale of Two Cities (1859), the opening: real text through the real tokenizer
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
        "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season "
        "of Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had "
        "nothing before us, we were all going direct to Heaven, we were all going direct the other way -- in short, "
        "the period was so far like the present period, that some of its noisiest authorities insisted on its being "
        "received, for good or for evil, in the superlative degree of comparison only.\n\nThere were a king with a "
        "large jaw and a queen with a plain face, on the throne of England; there were a king with a large jaw and a "
        "queen with a fair face, on the throne of France. In both countries it was clearer than crystal to the lords "
        "of the State preserves of loaves and fishes, that things in general were settled for ever.")

BLOCK, SELECTED = 16, 4
# the retrofit's layout scaled down: fla's block layout (l = d = l' = block), mean pooling, one shared K/V
RETROFIT = dict(attention="nsa", block_len=BLOCK, block_stride=BLOCK, select_len=BLOCK, num_selected=SELECTED,
                compression="mean", shared_kv=True)


def retrofit_kind(vocab: int = 97, window: int = 0, seed: int = 0, **overrides) -> Transformer:
    """A tiny random model of the retrofit's kind (module docstring): 6 query heads over 2 KV heads, head_dim 16,
    2 layers, float32 on the CPU. Norm weights are random too, so a swapped norm would show in the logits."""
    fields = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=16, v_head_dim=16, intermediate_size=96, max_position_embeddings=2048, window=window,
                  rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, **RETROFIT)
    model = Transformer(ModelConfig(**{**fields, **overrides})).init_weights(std=0.2, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def prompt(tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] >= 12 * BLOCK  # at least 12 complete blocks, of which the last query keeps SELECTED
    return ids


@pytest.mark.parametrize("window", [0, pytest.param(32, marks=pytest.mark.slow)], ids=["no-window", "window-32"])
def test_fla_loads_our_export_and_gives_our_logits(window, tmp_path, monkeypatch, tokenizer, prompt):
    pytest.importorskip("fla.models", reason="flash-linear-attention (fla-core) is not installed")
    from fla.models import NSAForCausalLM as FlaModel

    selections = run_fla_on_cpu(monkeypatch)
    model = retrofit_kind(len(tokenizer), window, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # SmolLM2's ids
    save_fla(model, None, tmp_path, tokenizer=tokenizer)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in ("model_type", "num_heads", "num_kv_heads", "head_dim", "block_size",
                                    "block_counts", "window_size", "rope_theta", "norm_eps", "tie_word_embeddings",
                                    "intermediate_size", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "dtype")} \
        == dict(model_type="nsa", num_heads=6, num_kv_heads=2, head_dim=16, block_size=BLOCK, block_counts=SELECTED,
                window_size=window, rope_theta=100000.0, norm_eps=1e-5, tie_word_embeddings=True,
                intermediate_size=96, fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False, dtype="float32")

    fla_model, info = FlaModel.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    fla_model.eval()
    assert fla_model.lm_head.weight.data_ptr() == fla_model.model.embeddings.weight.data_ptr()  # tied
    ours_state = model.state_dict()  # every tensor as we wrote it (the padding row of fla's embedding included)
    assert all(torch.equal(t, ours_state[our_name(n, FLA_NAME_MAP)]) for n, t in fla_model.state_dict().items())
    assert fla_model.model.layers[0].attn.num_kv_groups == 3 and fla_model.model.layers[0].attn.window_size == window
    with torch.no_grad():
        theirs = fla_model(input_ids=prompt).logits
    ours = model(prompt).logits
    error = rel_err(theirs, ours)
    print(f"window {window}: fla vs ours, relative error {error:.2e} over {prompt.shape[1]} tokens")
    assert error < 1e-4
    # selection really dropped blocks: the last query sees every complete block but keeps SELECTED per KV head
    kept = (selections[0][0, -1] >= 0).sum(-1)
    assert kept.tolist() == [SELECTED, SELECTED] and prompt.shape[1] // BLOCK >= 3 * SELECTED

    back = from_pretrained(tmp_path)  # our loader reads the exported folder: the same model
    assert back.config == model.config and back.lm_head.weight is back.embed.weight
    assert torch.equal(back(prompt).logits, ours)
    engine = load_native(str(tmp_path), nsa_only=True, device="cpu")  # the nsa: spec, with the tokenizer beside it
    assert engine.count_tokens(TEXT) == prompt.shape[1]
    assert torch.equal(engine.model(prompt).logits, ours)


def test_cpu_stand_in_is_fla_naive_nsa_where_that_runs(monkeypatch):
    """fla_nsa_on_cpu against fla's naive_nsa itself on what naive_nsa takes (16 query heads per KV head, no window):
    the same numbers, so the stand-in changes nothing but the group-size assert and the window's provider."""
    pytest.importorskip("fla.ops.nsa.naive", reason="flash-linear-attention (fla-core) is not installed")
    from fla.ops.nsa.naive import naive_nsa

    run_fla_on_cpu(monkeypatch)  # fla's mean pooling is an autotuned Triton kernel too
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 64, 16, 16, generator=g), torch.randn(1, 64, 1, 16, generator=g), \
        torch.randn(1, 64, 1, 16, generator=g)
    gates = [torch.rand(1, 64, 16, generator=g) for _ in range(3)]
    args = dict(block_counts=2, block_size=8, window_size=0)  # 8 blocks, 2 kept
    assert torch.equal(fla_nsa_on_cpu(q, k, v, *gates, **args), naive_nsa(q, k, v, *gates, **args))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_ours_fla_ours_keeps_every_tensor_and_field(tied, tmp_path):
    model = retrofit_kind(window=32, qkv_bias=True, tie_word_embeddings=tied)
    with torch.no_grad():  # biases away from init_weights' zeros, so a misplaced one would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ours = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    names = {our_name(k, FLA_EXPORT_MAP) for k in ours}
    assert None not in names and {our_name(n, FLA_NAME_MAP) for n in names} == set(ours)
    save_fla(model, None, tmp_path / "model")
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == names and ("lm_head.weight" in names) == (not tied)
    config, state = read_checkpoint(tmp_path / "model")
    assert config == model.config
    assert config_from_fla(fla_config_from(model.config)) == model.config
    assert set(state) == set(ours) and all(torch.equal(state[k], ours[k]) for k in ours)
    # a state dict with its config writes the same files
    save_fla(model.state_dict(), model.config, tmp_path / "state")
    for file in ("config.json", "model.safetensors"):
        assert (tmp_path / "state" / file).read_bytes() == (tmp_path / "model" / file).read_bytes()
    fla = pytest.importorskip("fla.models", reason="flash-linear-attention (fla-core) is not installed")
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    fla_model = fla.NSAForCausalLM(fla.NSAConfig(**{k: v for k, v in written.items() if k != "model_type"}))
    # fla's model has exactly these tensors (a tied model's state_dict names lm_head too; its checkpoint does not)
    assert set(fla_model.state_dict()) - {"lm_head.weight"} == names - {"lm_head.weight"}
    assert all(tuple(fla_model.state_dict()[n].shape) == tuple(ours[our_name(n, FLA_NAME_MAP)].shape) for n in names)


@pytest.mark.parametrize("overrides, message", [
    (dict(compression="mlp", compress_hidden_size=16), "compression 'mlp' (fla mean-pools each block)"),
    (dict(shared_kv=False), "shared_kv false (fla has one K/V for every branch)"),
    (dict(block_stride=8), "block_len=16, block_stride=8, select_len=16 (fla has one block_size for all three)"),
    (dict(select_len=32), "block_len=16, block_stride=16, select_len=32"),
    (dict(v_head_dim=8), "v_head_dim=8 != head_dim=16"),
    (dict(qk_norm=True), "qk_norm (fla has no q/k norm)"),
    (dict(o_bias=True), "o_bias (fla's o_proj has no bias)"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling 'linear' (fla's RoPE has no scaling)"),
    (dict(attention="full", sliding_window=32), "attention 'full' (fla's model_type nsa is NSA attention); "
                                                "sliding_window=32"),
    (dict(compression="mlp", compress_hidden_size=16, shared_kv=False, block_stride=8, window=32),
     "compression 'mlp' (fla mean-pools each block); shared_kv false"),
], ids=["mlp", "separate-kv", "stride", "select-len", "v-head-dim", "qk-norm", "o-bias", "rope-scaling",
        "full-window", "paper-layout"])
def test_what_fla_cannot_hold_is_one_line_and_writes_nothing(overrides, message, tmp_path):
    model = retrofit_kind(**overrides)
    with pytest.raises(ValueError) as error:
        save_fla(model, None, tmp_path / "out")
    text = str(error.value)
    assert "\n" not in text and text.startswith("config cannot be written in flash-linear-attention's NSA layout: ")
    assert message in text and not (tmp_path / "out").exists()


def test_a_state_that_does_not_fit_its_config_is_refused(tmp_path):
    model = retrofit_kind()
    state = dict(model.state_dict(), **{"layers.0.attn.k_compress.fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"do not fit the config: missing \[\], unexpected \['layers.0.attn.k_comp"):
        save_fla(state, model.config, tmp_path / "out")
    state = dict(model.state_dict(), **{"norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"wrong shape: norm.weight \(3,\) \(config: \(64,\)\)"):
        save_fla(state, model.config, tmp_path / "out")
    state = dict(model.state_dict(), **{"lm_head.weight": torch.zeros_like(model.embed.weight)})
    with pytest.raises(ValueError, match="tie_word_embeddings is true but lm_head.weight differs from embed.weight"):
        save_fla(state, model.config, tmp_path / "out")
    with pytest.raises(ValueError, match="give the config of a state dict"):
        save_fla(model.state_dict(), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fla_kernel_limits_name_what_its_op_refuses():
    retrofit = retrofit_kind(num_attention_heads=9, num_key_value_heads=3, head_dim=64, v_head_dim=64, window=512,
                             block_len=64, block_stride=64, select_len=64, num_selected=16).config
    limits = fla_kernel_limits(retrofit)
    assert limits == ["3 query heads per KV head: fla's parallel_nsa and naive_nsa assert a power of 2 >= 16",
                      "window_size=512: fla's window branch calls flash-attn (pip install flash-attn)"]
    assert fla_kernel_limits(retrofit_kind(num_attention_heads=32, num_key_value_heads=2).config) == []


# ---- nsa-eval export ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_nsa_dir(tmp_path, tokenizer):
    """Our checkpoint of the retrofit's kind with SmolLM2's tokenizer and a generation_config.json beside it."""
    from transformers import GenerationConfig

    model = retrofit_kind(len(tokenizer), window=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path / "ours"
    save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    return folder, model


def _export(*args):
    from nsa_eval.cli import main

    return CliRunner().invoke(main, ["export", *map(str, args)])


def _one_line_error(result, message):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output


def test_cli_export_writes_fla_layout_that_loads_back(tiny_nsa_dir, tmp_path, prompt):
    folder, model = tiny_nsa_dir
    out = tmp_path / "fla"
    result = _export("--model", f"nsa:{folder}", "--layout", "fla", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: flash-linear-attention NSA checkpoint" in result.output
    assert "window_size=32: fla's window branch calls flash-attn" in result.output  # a note on stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nsa" and config["num_kv_heads"] == 2 and config["window_size"] == 32
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {f.name for f in out.iterdir()}
    logits = model(prompt).logits
    assert torch.equal(from_pretrained(out)(prompt).logits, logits)
    # fla's layout back into fla's layout: the same files
    again = tmp_path / "again"
    assert _export("--model", f"nsa:{out}", "--layout", "fla", "--out", again).exit_code == 0
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (again / file).read_bytes() == (out / file).read_bytes()


def test_cli_export_refuses_in_one_line(tiny_nsa_dir, tmp_path, smollm2_dir):
    folder, _ = tiny_nsa_dir
    full = tmp_path / "full"
    (full / "sub").mkdir(parents=True)
    _one_line_error(_export("--model", f"nsa:{folder}", "--layout", "fla", "--out", full), "is not an empty folder")
    mlp = tmp_path / "mlp"
    save_pretrained(retrofit_kind(compression="mlp", compress_hidden_size=16), mlp)
    _one_line_error(_export("--model", f"nsa:{mlp}", "--layout", "fla", "--out", tmp_path / "o1"),
                    "cannot be written in flash-linear-attention's NSA layout: compression 'mlp'")
    separate = tmp_path / "separate"
    save_pretrained(retrofit_kind(shared_kv=False), separate)
    _one_line_error(_export("--model", f"nsa:{separate}", "--layout", "fla", "--out", tmp_path / "o2"),
                    "shared_kv false (fla has one K/V for every branch)")
    _one_line_error(_export("--model", "smollm2", "--layout", "fla", "--out", tmp_path / "o0"),  # full attention
                    "config.json cannot be written in flash-linear-attention's NSA layout: attention 'full' (fla's "
                    "model_type nsa is NSA attention)")
    _one_line_error(_export("--model", "openai:http://127.0.0.1:1/v1#m", "--layout", "fla", "--out", tmp_path / "o3"),
                    "is not a checkpoint folder; give nsa:PATH, hf:PATH, smollm2 or smollm2-nsa")
    _one_line_error(_export("--model", f"nsa:{tmp_path / 'absent'}", "--layout", "fla", "--out", tmp_path / "o4"),
                    "does not exist")
    assert not any((tmp_path / f"o{i}").exists() for i in range(5))
    assert _export("--model", f"nsa:{folder}", "--layout", "paper", "--out", tmp_path / "o5").exit_code == 2

