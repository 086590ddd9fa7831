"""Chunked prefill in the hf: backend (HFModel.prefill_chunk): the prompt goes through the model in slices over the
growing KV cache and gives what one pass gives, on a tiny random Llama and on the real SmolLM2. The memory it saves
on a GPU is not measured here (CPU only)."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest
from nsa_eval.model_adapters.hf import HFModel, _resolve_prefill_chunk
from nsa_eval.model_adapters.runtime.model import DEFAULT_PREFILL_CHUNK
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer
from nsa_eval.models import LoadOptions, load_model

PROMPTS = [
    "The capital of France is",
    [{"role": "user", "content": "Name three colours and say why you like each of them."}],
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
]


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2"])
def one_pass(request, tiny_llama_dir, smollm2):
    """The model with one-pass prefill (batch of 3), the reference for the chunked runs."""
    if request.param == "smollm2":
        return HFModel(smollm2.model, smollm2.tokenizer, "smollm2", batch_size=3)
    return HFModel.from_pretrained(str(tiny_llama_dir), name="tiny", device="cpu", batch_size=3)


def chunked(lm: HFModel, chunk: int) -> HFModel:
    return HFModel(lm.model, lm.tokenizer, lm.name, batch_size=lm.batch_size, prefill_chunk=chunk)


def prefill_widths(lm: HFModel, prompts) -> tuple[torch.Tensor, list[int], int]:
    """Left-pad `prompts` and prefill them: (last logits [B, V], tokens per forward call, cached tokens)."""
    input_ids, mask = lm._left_pad([lm.encode(p) for p in prompts])
    widths = []
    hook = lm.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                              with_kwargs=True)
    try:
        logits, cache = lm._prefill(input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    finally:
        hook.remove()
    return logits, widths, cache.get_seq_length()


@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["single", "left-padded-batch"])
@pytest.mark.slow
def test_chunked_prefill_gives_the_one_pass_logits(one_pass, prompts):
    reference, widths, cached = prefill_widths(one_pass, prompts)
    width = max(len(one_pass.encode(p)) for p in prompts)
    assert widths == [width] and cached == width
    for chunk in (7, width + 50):
        logits, widths, cached = prefill_widths(chunked(one_pass, chunk), prompts)
        # slices of at most `chunk` tokens (activation memory bounded by the chunk), the whole prompt in the cache
        assert widths == [min(chunk, width - start) for start in range(0, width, chunk)] and cached == width
        # equal up to float32 rounding (attention sums in another order); a wrong position or mask is off by >0.1
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_chunked_prefill_gives_the_one_pass_generations_and_loglikelihoods(one_pass):
    requests = [GenerationRequest(p, max_new_tokens=10) for p in PROMPTS]
    expected = [g.texts for g in one_pass.generate(requests)]
    alone = [one_pass.generate([r])[0].texts for r in requests[1:2]]
    for chunk in (7, 1000):
        lm = chunked(one_pass, chunk)
        results = lm.generate(requests)
        assert [g.texts for g in results] == expected
        assert all(g.prefill_ms > 0 for g in results)
        lm.batch_size = 1
        assert [lm.generate([r])[0].texts for r in requests[1:2]] == alone
    scoring = [LoglikelihoodRequest("The capital of France is", " Paris"), LoglikelihoodRequest("1, 2,", " 3, 4")]
    assert chunked(one_pass, 7).loglikelihood(scoring) == one_pass.loglikelihood(scoring)


def test_models_that_cannot_be_chunked_keep_one_pass(tiny_llama_dir, smollm2):
    # the NSA model slices its prompt itself (Transformer.prefill_chunk), so HFModel passes it whole
    config = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=16, v_head_dim=16, intermediate_size=48, max_position_embeddings=256)
    nsa = Transformer(config).init_weights(seed=0)
    assert HFModel(nsa, smollm2.tokenizer, "nsa").prefill_chunk is None
    assert _resolve_prefill_chunk(None, nsa, torch.device("cuda")) is None
    with pytest.raises(ValueError, match="--prefill-chunk applies to transformers models, not to Transformer"):
        HFModel(nsa, smollm2.tokenizer, "nsa", prefill_chunk=7)
    # training-free sparse attention chunks (test_hf_attention: sliced generation equals one pass)
    sparse = LoadOptions(device="cpu", attention="sparse")
    assert load_model(f"hf:{tiny_llama_dir}", sparse).prefill_chunk is None
    assert load_model(f"hf:{tiny_llama_dir}", replace(sparse, prefill_chunk=7)).prefill_chunk == 7


def test_default_and_bad_chunk_sizes(smollm2):
    assert _resolve_prefill_chunk(None, smollm2.model, torch.device("cuda")) == DEFAULT_PREFILL_CHUNK
    assert _resolve_prefill_chunk(None, smollm2.model, torch.device("cpu")) is None
    assert _resolve_prefill_chunk(0, smollm2.model, torch.device("cuda")) is None
    for bad in (-1, 2.5, True):  # checked once, where the load options are made, for every backend
        with pytest.raises(ValueError, match="--prefill-chunk must be 0"):
            LoadOptions(prefill_chunk=bad)


@pytest.mark.slow
def test_cli_prefill_chunk_is_recorded_and_resumes_across_chunks(tiny_llama_dir, tmp_path):
    from nsa_eval.cli import main

    niah = ["--tasks", "niah", "--niah-lengths", "256", "--niah-depths", "0,100", "--quiet", "--device", "cpu"]
    one_pass, sliced = tmp_path / "one-pass", tmp_path / "sliced"
    for out, extra in [(one_pass, []), (sliced, ["--prefill-chunk", "50"])]:
        result = CliRunner().invoke(main, ["run", "--model", f"hf:{tiny_llama_dir}", *niah, *extra, "--output", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
    runs = [json.loads((out / "run.json").read_text()) for out in (one_pass, sliced)]
    assert [r["prefill_chunk"] for r in runs] == [None, 50]
    assert runs[0]["config_hash"] == runs[1]["config_hash"]  # float rounding only: a run resumes across chunk sizes

    def responses(out):
        return [json.loads(line)["responses"] for line in (out / "samples" / "niah.jsonl").read_text().splitlines()]

    assert responses(sliced) == responses(one_pass)
    bad = CliRunner().invoke(main, ["run", "--model", "openai:http://127.0.0.1:9/v1#m", "--prefill-chunk", "8", *niah,
                                    "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "--prefill-chunk applies to smollm2, hf: and nsa: checkpoints" in bad.output, bad.output
    assert "Traceback" not in bad.output
