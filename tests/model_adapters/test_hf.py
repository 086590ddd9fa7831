"""The hf: backend on the real SmolLM2 model: batching, stops, sampling, truncation, log-likelihood."""

import pytest
import torch

from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest, ModelLoadError
from nsa_eval.model_adapters.hf import HFModel, truncate_middle

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.mark.slow
def test_greedy_batched_equals_one_by_one(smollm2):
    requests = [
        GenerationRequest("The capital of France is", max_new_tokens=8),
        GenerationRequest(CHAT, max_new_tokens=12),
        GenerationRequest("1, 2, 3, 4,", max_new_tokens=6),
    ]
    alone = [smollm2.generate([r])[0].texts for r in requests]
    smollm2.batch_size = 3
    try:
        together = [g.texts for g in smollm2.generate(requests)]
    finally:
        smollm2.batch_size = 1
    assert together == alone
    # the chat prompt went through the chat template: the model answers, it does not continue the user turn
    assert smollm2.render(CHAT).startswith("<|im_start|>") and smollm2.render(CHAT).endswith("assistant\n")


@pytest.mark.slow
def test_greedy_matches_transformers_generate(smollm2):
    ids = torch.tensor([smollm2.encode("The capital of France is")])
    reference = smollm2.model.generate(ids, max_new_tokens=10, do_sample=False)
    expected = smollm2.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    ours = smollm2.generate([GenerationRequest("The capital of France is", max_new_tokens=10)])[0]
    assert ours.texts[0] == expected
    assert ours.prompt_tokens == ids.shape[1] and ours.prefill_ms > 0 and ours.decode_tokens_per_s > 0


@pytest.mark.slow
def test_stop_sequences_cut_the_text(smollm2):
    full = smollm2.generate([GenerationRequest("1, 2, 3, 4,", max_new_tokens=12)])[0].texts[0]
    assert "7" in full
    stopped = smollm2.generate([GenerationRequest("1, 2, 3, 4,", max_new_tokens=12, stop=["7"])])[0]
    assert stopped.texts[0] == full[: full.index("7")]
    assert stopped.finish_reasons == ["stop"]


@pytest.mark.slow
def test_sampling_is_seeded_per_request(smollm2):
    request = GenerationRequest(CHAT, max_new_tokens=12, temperature=1.0, top_p=0.95, n=3, seed=7)
    first = smollm2.generate([request])[0]
    again = smollm2.generate([GenerationRequest("unrelated", max_new_tokens=3), request])[1]
    assert first.texts == again.texts and len(first.texts) == 3
    assert len(set(first.texts)) > 1, "n samples at temperature 1 should differ"
    other = smollm2.generate([GenerationRequest(CHAT, max_new_tokens=12, temperature=1.0, n=3, seed=8)])[0]
    assert other.texts != first.texts


def test_greedy_n_copies_one_completion(smollm2):
    result = smollm2.generate([GenerationRequest("Hello", max_new_tokens=4, n=3)])[0]
    assert len(result.texts) == 3 and len(set(result.texts)) == 1


@pytest.mark.slow
def test_long_prompt_is_cut_in_the_middle_and_recorded(smollm2_dir):
    model = HFModel.from_pretrained(str(smollm2_dir), max_length=64, device="cpu")
    prompt = "start " + "filler words " * 100 + "end"
    result = model.generate([GenerationRequest(prompt, max_new_tokens=8)])[0]
    assert result.truncated and result.prompt_tokens == 64 - 8
    short = model.generate([GenerationRequest("short", max_new_tokens=8)])[0]
    assert not short.truncated


def test_truncate_middle_keeps_both_ends():
    ids, cut = truncate_middle(list(range(10)), 5)
    assert cut and ids == [0, 1, 7, 8, 9]
    assert truncate_middle([1, 2], 5) == ([1, 2], False)


@pytest.mark.slow
def test_loglikelihood_equals_a_manual_forward(smollm2):
    context, continuation = "The capital of France is", " Paris"
    result = smollm2.loglikelihood([LoglikelihoodRequest(context, continuation)])[0]
    whole = smollm2.tokenizer(context + continuation)["input_ids"]
    n_context = len(smollm2.tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    expected = sum(logits[i - 1, whole[i]].item() for i in range(n_context, len(whole)))
    assert result.logprob == pytest.approx(expected, abs=1e-4)
    assert result.continuation_tokens == len(whole) - n_context
    wrong = smollm2.loglikelihood([LoglikelihoodRequest(context, " Berlin")])[0]
    assert result.is_greedy and not wrong.is_greedy and wrong.logprob < result.logprob
    smollm2.batch_size = 2
    try:
        batched = smollm2.loglikelihood([LoglikelihoodRequest(context, " Berlin"), LoglikelihoodRequest(context, continuation)])
    finally:
        smollm2.batch_size = 1
    assert batched[1].logprob == pytest.approx(result.logprob, abs=1e-4)


def test_count_tokens_counts_the_chat_template(smollm2):
    assert smollm2.count_tokens("hello world") == len(smollm2.tokenizer("hello world")["input_ids"])
    assert smollm2.count_tokens([{"role": "user", "content": "hello world"}]) > smollm2.count_tokens("hello world") + 5


def test_missing_or_broken_model_folders_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        HFModel.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        HFModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        HFModel.from_pretrained(str(tmp_path))
