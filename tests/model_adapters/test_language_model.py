"""The LanguageModel base class's defaults: what a backend that implements only generate, loglikelihood and
count_tokens answers to the rest of the interface."""

import pytest

from nsa_eval.model_adapters.base import Generation, GenerationRequest, LanguageModel


class Echo(LanguageModel):
    """Answers each prompt with itself, and records the batches generate() was given."""

    name, max_length = "echo", 64

    def __init__(self):
        self.batches = []

    def generate(self, requests):
        self.batches.append([r.prompt for r in requests])
        return [Generation([r.prompt], [1], ["stop"], prompt_tokens=1) for r in requests]

    def loglikelihood(self, requests):
        raise AssertionError("not asked")

    def count_tokens(self, text):
        return len(text)


def test_step_defaults_to_generate_on_what_was_queued_with_indices_counted_over_the_models_life():
    model = Echo()
    assert not model.has_unfinished() and model.step().finished == []
    assert [model.add_request(GenerationRequest(p)) for p in "ab"] == [0, 1]
    assert model.has_unfinished()
    out = model.step()
    assert [(index, generation.texts[0]) for index, generation in out.finished] == [(0, "a"), (1, "b")]
    assert out.tokens == []  # no tokens to report: the base does not stream
    assert not model.has_unfinished()
    assert [model.add_request(GenerationRequest(p)) for p in "cde"] == [2, 3, 4]
    model.abort()
    assert not model.has_unfinished() and model.step().finished == []
    model.add_request(GenerationRequest("f"))
    assert [index for index, _ in model.step().finished] == [5]
    assert model.batches == [["a", "b"], ["f"]]


def test_the_other_defaults():
    model = Echo()
    assert (model.chat, model.compile_s, model.streams, model.describe()) == (False, 0.0, False, {})
    with pytest.raises(ValueError, match=r"^echo \(Echo\) does not score whole documents"):
        model.loglikelihood_rolling([])
    with pytest.raises(TypeError, match="count_tokens"):
        type("Half", (LanguageModel,), {"generate": None, "loglikelihood": None})()
