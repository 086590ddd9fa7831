"""The NSA transformer (model_adapters/runtime/) and the nsa: backend: kernels, cache, checkpoints, fla's layout,
bad input. Tiny random models built here; CPU tests use the reference kernels unless they say Triton (interpreter)."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nsa_eval.kernels.nsa.layout import FLA_LAYOUT, PAPER_LAYOUT
from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest, ModelLoadError
from nsa_eval.model_adapters.native import load_native
from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained, save_pretrained
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer
from nsa_eval.model_adapters.runtime.weights import FLA_NAME_MAP

# the paper's layout (independent K/V, MLP compression, window) and flash-linear-attention's (l = d = l', shared
# K/V, mean pooling, no window), scaled down
PAPER = dict(block_len=16, block_stride=8, select_len=16, num_selected=4, window=32, compression="mlp",
             compress_hidden_size=16, shared_kv=False)
FLA = dict(block_len=16, block_stride=16, select_len=16, num_selected=4, window=0, compression="mean", shared_kv=True)


def tiny(layout=PAPER, vocab=97, layers=2, seed=0, std=0.3, **overrides) -> Transformer:
    """A tiny random NSA model, float32 on the CPU (std 0.3 makes its logits peaked, so argmax is stable)."""
    fields = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, v_head_dim=16, intermediate_size=48, max_position_embeddings=2048)
    config = ModelConfig(**{**fields, **layout, **overrides})
    return Transformer(config).init_weights(std=std, seed=seed).eval()


def greedy_without_cache(model, ids, steps):
    """Greedy tokens, each from a full forward pass over everything so far (no cache)."""
    ids = ids.clone()
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def greedy_with_cache(model, ids, steps):
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, tokens = out.past_key_values, [ids]
    for _ in range(steps):
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        out = model(tokens[-1], past_key_values=cache, use_cache=True)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("layout", [PAPER, FLA, {**FLA, "window": 32, "block_stride": 8, "select_len": 32}],
                         ids=["paper", "fla", "shared-kv-window"])
@pytest.mark.slow
def test_greedy_generation_with_the_cache_equals_recomputing(layout):
    model = tiny(layout)
    prompt = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(1))
    # 41 + 30 tokens cross several compressed blocks (every 8 or 16 tokens), selection blocks and the window
    with_cache = greedy_with_cache(model, prompt, 30)
    assert torch.equal(with_cache, greedy_without_cache(model, prompt, 30))
    assert len(set(with_cache[0, 41:].tolist())) > 3  # the model does not repeat one token


@pytest.mark.slow
def test_decode_logits_equal_the_prompt_logits_and_the_cache_grows():
    model = tiny(PAPER)
    model.decode_reserve = 4  # the cache must grow (reallocate) during the steps below
    ids = torch.randint(0, 97, (3, 60), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    out = model(ids[:, :20], use_cache=True)
    cache = out.past_key_values
    assert cache.capacity == 24
    for t in range(20, 60):
        step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, 0]
        torch.testing.assert_close(step, full[:, t], rtol=1e-4, atol=1e-4)
    assert cache.capacity >= 60 and cache.host_lengths == [60] * 3 and cache.lengths.tolist() == [60] * 3


def test_decode_steps_reuse_the_cache_until_it_is_full():
    """A decode step through forward grows the cache only when it is full, by decode_reserve at once (a growth
    reallocates every cache tensor and drops the CUDA graphs: growing at each step would replay none)."""
    model = tiny(PAPER)
    model.decode_reserve = 8
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    cache = model(ids[:, :20], use_cache=True).past_key_values
    capacities = []
    for t in range(20, 30):
        model(ids[:, t:t + 1], past_key_values=cache)
        capacities.append(cache.capacity)
    assert capacities == [28] * 8 + [37, 37]


def test_rope_frequencies_stay_float32_in_a_16_bit_model():
    """model.to(bfloat16) casts the weights, not inv_freq: RoPE angles of late positions need float32."""
    model = tiny(PAPER)
    expected = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, expected)


def test_padded_rows_equal_rows_alone():
    model = tiny(PAPER)
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    out = model(ids, attention_mask=mask, use_cache=True)
    alone = model(ids[1:, 13:]).logits
    torch.testing.assert_close(out.logits[1, 13:], alone[0], rtol=1e-5, atol=1e-5)
    assert out.logits[1, :13].abs().max() == 0
    assert out.past_key_values.host_lengths == [50, 37]
    # the next token continues each row at its own position
    step = model(ids[:, :1], past_key_values=out.past_key_values).logits[1, 0]
    torch.testing.assert_close(step, model(torch.cat([ids[1:, 13:], ids[1:, :1]], 1)).logits[0, -1], rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="gap"):
        model(ids, attention_mask=torch.tensor([[1] * 50, [1, 0] * 25]))


@pytest.mark.slow
def test_rows_of_different_lengths_decode_as_each_row_alone():
    """Rows whose compressed blocks complete on different steps (phi runs on a step where only some row completes
    one, and is skipped on the others) decode as each row alone."""
    model = tiny(PAPER)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1: 40 tokens, row 0: 45; blocks complete every 8 tokens, on different steps
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(20):
        tokens.append(model(tokens[-1], past_key_values=out.past_key_values).logits[:, -1].argmax(-1, keepdim=True))
    batched = torch.cat(tokens, 1)
    for row, start in ((0, 0), (1, 5)):
        alone = greedy_without_cache(model, ids[row:row + 1, start:], 21)[:, 45 - start:]
        assert torch.equal(batched[row:row + 1], alone)


def test_fused_projections_follow_weights_changed_after_use(tmp_path):
    """The one-GEMM projections (built on first use) see weights loaded in place later, and a used model saves."""
    model, other = tiny(PAPER), tiny(PAPER, seed=1)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(7))
    before = model(ids).logits
    model.load_state_dict(other.state_dict())  # copies into the existing (fused) storage
    torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)
    model.load_state_dict(tiny(PAPER).state_dict(), assign=True)  # new tensors: fused again
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    save_pretrained(model, tmp_path)
    torch.testing.assert_close(from_pretrained(tmp_path)(ids).logits, before, rtol=0, atol=0)
    fresh = tiny(PAPER)  # first use under inference_mode (as lm-eval runs models), then outside it
    with torch.inference_mode():
        inside = fresh(ids).logits.clone()
    torch.testing.assert_close(fresh(ids).logits, inside, rtol=0, atol=0)
    torch.testing.assert_close(inside, before, rtol=0, atol=0)


def test_full_attention_variant_with_cache_equals_recomputing():
    model = tiny(PAPER, attention="full", v_head_dim=8)
    prompt = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    assert torch.equal(greedy_with_cache(model, prompt, 12), greedy_without_cache(model, prompt, 12))
    ours = model(prompt).logits
    model.sdpa_backend = "math"  # the benchmark's SDPA path computes the same attention
    torch.testing.assert_close(model(prompt).logits, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, kernels", [(PAPER, "triton"), (FLA, "triton"), (PAPER, "triton-fused")],
                         ids=["paper", "fla", "paper-fused-decode"])
@pytest.mark.slow
def test_triton_kernels_equal_the_reference(layout, kernels):
    """The whole model on the Triton kernels (interpreter on the CPU) against the reference, prefill and decode
    ('triton-fused': the NSA decode step in two launches)."""
    model = tiny(layout, layers=1)
    ids = torch.randint(0, 97, (1, 56), generator=torch.Generator().manual_seed(5))
    reference = model(ids).logits
    model.kernel_choice = kernels
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    out = model(ids[:, :54], use_cache=True, logits_to_keep=1)
    for t in (54, 55):
        step = model(ids[:, t:t + 1], past_key_values=out.past_key_values).logits[0, 0]
        torch.testing.assert_close(step, reference[0, t], rtol=1e-4, atol=1e-4)


def test_the_kernel_table_offers_the_two_launch_nsa_decode():
    """kernel_choice 'triton-fused': the 'triton' table with kernels/nsa/fused_decode.py's step in place of the
    five-launch one, and nothing else changed."""
    from nsa_eval.kernels.nsa import decode, fused_decode
    from nsa_eval.model_adapters.runtime.ops import kernel_table

    fused, five = kernel_table("triton-fused"), kernel_table("triton")
    assert five.nsa_decode is decode.nsa_decode and fused.nsa_decode is fused_decode.nsa_decode
    assert fused._replace(nsa_decode=five.nsa_decode) == five
    with pytest.raises(ValueError, match="'triton-fused'"):
        kernel_table("fused")


def test_save_load_round_trip(tmp_path):
    model = tiny(PAPER, tie_word_embeddings=True)
    save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nsa_eval"
    assert {k: saved[k] for k in PAPER} == PAPER and saved["head_dim"] == 16 and saved["v_head_dim"] == 16
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 97, (2, 30))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    as_bf16 = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16


# ---- flash-linear-attention ---------------------------------------------------------------------------------


def test_fla_names_map_onto_ours():
    model = tiny(FLA, tie_word_embeddings=False)
    ours = set(model.state_dict())
    fla_names = ["model.embeddings.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{part}" for i in range(2) for part in
        ["attn_norm.weight", "mlp_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
         "attn.g_proj.weight", "attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "mlp.down_proj.weight"]]
    from nsa_eval.model_adapters.runtime.weights import our_name

    assert {our_name(n, FLA_NAME_MAP) for n in fla_names} == ours
    assert our_name("model.layers.0.attn.rotary.inv_freq", FLA_NAME_MAP) is None
    assert len(FLA_NAME_MAP) == 7


@pytest.mark.slow
def test_fla_checkpoint_gives_fla_logits(tmp_path, monkeypatch):
    """A tiny random model of flash-linear-attention's own code (fla-core), saved by it, loaded by us: equal logits.
    fla runs on the CPU with its attention op swapped for fla's own PyTorch reference (naive_nsa: its Triton kernels
    are autotuned, which needs a GPU driver) and its autotuned helper kernels (rotary) pinned to their first config;
    its window branch needs flash-attn (not installed), so window_size=0."""
    pytest.importorskip("fla.models", reason="flash-linear-attention (fla-core) is not installed")
    from triton.runtime.autotuner import Autotuner

    import fla.layers.nsa as fla_layer
    from fla.models import NSAConfig as FlaConfig
    from fla.models import NSAForCausalLM as FlaModel
    from fla.ops.nsa.naive import naive_nsa

    monkeypatch.setattr(fla_layer, "parallel_nsa", naive_nsa)
    monkeypatch.setattr(Autotuner, "prune_configs", lambda self, kwargs, *args: self.configs[:1])
    config = FlaConfig(hidden_size=64, num_hidden_layers=2, num_heads=16, num_kv_heads=1, head_dim=16, block_size=16,
                       block_counts=4, window_size=0, vocab_size=100, max_position_embeddings=256, fuse_norm=False,
                       fuse_swiglu=False, fuse_cross_entropy=False)
    torch.manual_seed(0)
    fla_model = FlaModel(config).eval()
    with torch.no_grad():
        for p in fla_model.parameters():
            p.normal_(0, 0.2)
    fla_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.shared_kv and ours.config.compression == "mean" and ours.config.select_len == 16
    ids = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(6))  # 6 blocks, 4 selected
    with torch.no_grad():
        expected = fla_model(input_ids=ids).logits
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)


SHARED_KV_WINDOW = {**FLA, "window": 32, "block_stride": 8, "select_len": 32}


@pytest.mark.parametrize("layout", [PAPER, FLA, SHARED_KV_WINDOW], ids=["paper", "fla", "shared-kv-window"])
@pytest.mark.slow
def test_chunked_prefill_equals_one_pass(layout):
    """Slices of 7 and 16 tokens over the cache (compressed blocks, selection blocks and the window cross the slice
    boundaries): the logits of one pass, with and without use_cache, also for a left-padded row; the decode steps
    after a sliced prompt continue as after one pass."""
    model = tiny(layout)
    ids = torch.randint(0, 97, (2, 53), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    one_pass = model(ids, attention_mask=mask, use_cache=True).logits
    continuation = greedy_with_cache(model, ids, 12)
    for chunk in (7, 16):
        model.prefill_chunk = chunk
        # float32 rounding only (other matmul shapes): 1e-4, as the decode steps against the prompt's logits
        torch.testing.assert_close(model(ids, attention_mask=mask, use_cache=True).logits, one_pass, rtol=1e-4,
                                   atol=1e-4)
        torch.testing.assert_close(model(ids[:1]).logits, one_pass[:1], rtol=1e-4, atol=1e-4)
        assert torch.equal(greedy_with_cache(model, ids, 12), continuation)


@pytest.mark.slow
def test_chunked_prefill_on_triton_kernels_and_sdpa():
    """Slices after cached tokens on the Triton NSA kernels (interpreter on the CPU) and on the SDPA baseline."""
    model = tiny(PAPER, layers=1)
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(7))
    reference = model(ids).logits
    model.kernel_choice, model.prefill_chunk = "triton", 16
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    full = tiny(PAPER, attention="full", v_head_dim=8)
    ours = full(ids).logits
    full.sdpa_backend, full.prefill_chunk = "math", 7
    torch.testing.assert_close(full(ids).logits, ours, rtol=1e-5, atol=1e-5)



# ---- the nsa: backend ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nsa_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random NSA checkpoint (the paper's layout) saved with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path_factory.mktemp("tiny-nsa")
    model = tiny(PAPER, vocab=len(tokenizer), std=0.2, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_nsa_backend_batches_stops_and_samples(nsa_dir):
    lm = load_native(str(nsa_dir), batch_size=3)
    assert lm.name == nsa_dir.name and lm.max_length == 2048
    requests = [GenerationRequest("The capital of France is", max_new_tokens=8),
                GenerationRequest("Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12", max_new_tokens=6),
                GenerationRequest("Hello", max_new_tokens=5, temperature=1.0, top_p=0.9, n=2, seed=3)]
    together = lm.generate(requests)
    lm.batch_size = 1
    alone = [lm.generate([r])[0] for r in requests]
    assert [g.texts for g in together] == [g.texts for g in alone]
    assert together[0].new_tokens == [8] and together[0].prefill_ms > 0 and together[0].decode_tokens_per_s > 0
    text = together[0].texts[0]
    stopped = lm.generate([GenerationRequest("The capital of France is", max_new_tokens=8, stop=[text[3:6]])])[0]
    assert stopped.texts[0] == text[:text.index(text[3:6])] and stopped.finish_reasons == ["stop"]
    scores = lm.loglikelihood([LoglikelihoodRequest("The capital of France is", " Paris"),
                               LoglikelihoodRequest("Hello", " world")])
    assert all(s.logprob < 0 for s in scores)
    lm.model.prefill_chunk = 7  # HFModel's generation loop over a prompt prefilled in slices
    assert [g.texts for g in lm.generate(requests[:2])] == [g.texts for g in alone[:2]]


@pytest.mark.slow
def test_cli_runs_niah_on_an_nsa_checkpoint(nsa_dir, tmp_path):
    from nsa_eval.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--model", f"nsa:{nsa_dir}", "--tasks", "niah", "--niah-lengths", "256",
                                       "--niah-depths", "0,100", "--quiet", "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["niah"]["n"] == 2 and metrics["tasks"]["niah"]["efficiency"]["prefill_ms_mean"] > 0
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["model"]["spec"] == f"nsa:{nsa_dir}" and run_info["model_attention"] == "nsa"
    from nsa_eval.report.build import settings_text

    assert settings_text(run_info).startswith("NSA attention (the checkpoint's own)")  # not the --attention default
    # --prefill-chunk reaches the NSA model, which slices its prompt over its own cache: same answers
    sliced = tmp_path / "sliced"
    result = CliRunner().invoke(main, ["run", "--model", f"nsa:{nsa_dir}", "--tasks", "niah", "--niah-lengths", "256",
                                       "--niah-depths", "0,100", "--quiet", "--prefill-chunk", "50", "--output",
                                       str(sliced)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((sliced / "run.json").read_text())["prefill_chunk"] == 50
    responses = lambda run: [json.loads(line)["responses"] for line in (run / "samples" / "niah.jsonl").open()]  # noqa: E731
    assert responses(sliced) == responses(out)
    from nsa_eval.models import LoadOptions, load_model

    assert load_model(f"nsa:{nsa_dir}", LoadOptions(device="cpu", prefill_chunk=50)).model.prefill_chunk == 50


# ---- bad input ----------------------------------------------------------------------------------------------


def _broken_checkpoint(tmp_path, nsa_dir, how):
    folder = tmp_path / how
    folder.mkdir()
    for f in nsa_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    if how == "no-nsa-fields":
        for key in ("block_len", "select_len", "window"):
            del config[key]
    elif how == "not-nsa":
        config["model_type"] = "llama"
    elif how == "shape":
        config["intermediate_size"] = 64
    elif how == "missing-tensor":
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        del state["layers.1.attn.k_compress.fc1.weight"]
        save_file(state, str(folder / "model.safetensors"))
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how == "corrupt-weights":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 64)
    elif how == "bad-json":
        (folder / "config.json").write_text("{model_type: nsa_eval")
        return folder
    elif how == "no-tokenizer":
        for f in folder.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                f.unlink()
    elif how == "bad-block-sizes":
        config["block_stride"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("how, message", [
    ("no-nsa-fields", "lacks block_len, select_len, window"),
    ("not-nsa", "model_type 'llama', not an NSA checkpoint"),
    ("shape", "has shape (48, 32) but config.json implies (64, 32)"),
    ("missing-tensor", "missing 1 (layers.1.attn.k_compress.fc1.weight)"),
    ("no-weights", "has no weights (model.safetensors)"),
    ("corrupt-weights", "could not read weights"),
    ("bad-json", "is not valid JSON"),
    ("no-tokenizer", "no usable tokenizer"),
    ("bad-block-sizes", "block_stride=5 must divide block_len=16"),
])
def test_bad_checkpoints_fail_in_one_line(tmp_path, nsa_dir, how, message):
    folder = _broken_checkpoint(tmp_path, nsa_dir, how)
    with pytest.raises(ModelLoadError) as error:
        load_native(str(folder), nsa_only=True)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_bad_nsa_spec_is_one_line_and_exit_1(tmp_path, nsa_dir):
    from nsa_eval.cli import main

    folder = _broken_checkpoint(tmp_path, nsa_dir, "no-weights")
    for spec, message in [(f"nsa:{folder}", "has no weights"), ("nsa:", "needs a checkpoint folder"),
                          (f"nsa:{tmp_path / 'absent'}", "does not exist")]:
        result = CliRunner().invoke(main, ["run", "--model", spec, "--tasks", "niah", "--output", str(tmp_path / "o")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith("Error:") and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["run", "--model", f"nsa:{nsa_dir}", "--attention", "sparse", "--tasks", "niah",
                                       "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "applies to smollm2 and hf: checkpoints" in result.output


def test_config_validation():
    with pytest.raises(ValueError, match="num_attention_heads=6 is not a multiple of num_key_value_heads=4"):
        tiny(PAPER, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="compression must be 'mlp' or 'mean'"):
        tiny({**PAPER, "compression": "max"})
    with pytest.raises(ValueError, match="decode step takes one token per cached sequence"):
        model = tiny(PAPER)
        cache = model(torch.zeros(2, 5, dtype=torch.long), use_cache=True).past_key_values
        model(torch.zeros(2, 3, dtype=torch.long), past_key_values=cache)


# ---- GPU (bfloat16) -------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu  # skipped where torch sees no CUDA device (tests/conftest.py)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gpu_model(layout, **overrides):
    """Paper head dims (192 / 128), 16 query heads in 2 groups, 2 layers, on the GPU in bfloat16."""
    config = ModelConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=16,
                       num_key_value_heads=2, head_dim=192, v_head_dim=128, intermediate_size=512,
                       max_position_embeddings=8192, **{**layout, **overrides})
    return Transformer(config).init_weights(std=0.05, seed=0).cuda().eval()


GPU_PAPER = dict(**asdict(PAPER_LAYOUT), compression="mlp",
                 compress_hidden_size=64, shared_kv=False)
GPU_FLA = dict(**asdict(FLA_LAYOUT), compression="mean",
               shared_kv=True)


@gpu
@pytest.mark.parametrize("layout", [GPU_PAPER, GPU_FLA], ids=["paper", "fla"])
def test_gpu_bf16_model_matches_the_float32_reference(layout):
    model = gpu_model(layout)
    ids = torch.randint(0, 512, (2, 1600), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    model.kernel_choice = "reference"  # float32 weights, the reference kernels on CUDA tensors
    reference = model(ids, attention_mask=mask).logits
    model.kernel_choice = "auto"
    model.to(torch.bfloat16)
    ours = model(ids, attention_mask=mask).logits
    assert rel_err(ours[0], reference[0]) < 3e-2 and rel_err(ours[1, 300:], reference[1, 300:]) < 3e-2


@gpu
@pytest.mark.parametrize("layout", [GPU_PAPER, GPU_FLA], ids=["paper", "fla"])
def test_gpu_graph_decode_equals_eager_and_the_prompt(layout):
    model = gpu_model(layout).to(torch.bfloat16)
    ids = torch.randint(0, 512, (3, 1100), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    full = model(ids).logits
    results = {}
    for graphs in (False, True):
        model.cuda_graphs = graphs
        out = model(ids[:, :1000], use_cache=True, logits_to_keep=1)
        results[graphs] = torch.stack([model(ids[:, t:t + 1], past_key_values=out.past_key_values).logits[:, 0]
                                       for t in range(1000, 1100)], 1)
        captured = [graph for graph, _ in out.past_key_values.graphs.captured.values()]
        # captured and replayed: the step that makes a compressed block and the one that does not
        assert (len(captured), all(isinstance(g, torch.cuda.CUDAGraph) for g in captured)) == ((2, True) if graphs
                                                                                               else (0, True))
    assert torch.equal(results[True], results[False])
    assert rel_err(results[True], full[:, 1000:1100]) < 3e-2


@gpu
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_gpu_sdpa_baseline_computes_our_full_attention(backend):
    model = gpu_model(GPU_PAPER, attention="full").to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 700), device="cuda")
    ours = model(ids[:, :600], use_cache=True)
    ours_steps = [model(ids[:, t:t + 1], past_key_values=ours.past_key_values).logits for t in (600, 601)]
    model.sdpa_backend = backend
    theirs = model(ids[:, :600], use_cache=True)
    assert rel_err(theirs.logits, ours.logits) < 2e-2
    # SDPA decode reads a fixed number of keys per graph (the benchmark's baseline): the first, eager, step is exact
    step = model(ids[:, 600:601], past_key_values=theirs.past_key_values).logits
    assert rel_err(step, ours_steps[0]) < 2e-2
