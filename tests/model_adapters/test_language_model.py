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


def test_generate_iter_defaults_to_generate_with_later_requests_numbered_after():
    model = Echo()
    arrivals = [[GenerationRequest("c"), GenerationRequest("d")], [GenerationRequest("e")], []]
    tokens = []
    answers = list(model.generate_iter([GenerationRequest("a"), GenerationRequest("b")], more=lambda: arrivals.pop(0),
                                       on_token=lambda *event: tokens.append(event)))
    assert [(index, generation.texts[0]) for index, generation in answers] == list(enumerate("abcde"))
    assert model.batches == [["a", "b"], ["c", "d"], ["e"]] and not arrivals
    assert not tokens  # no tokens to report: the base does not stream
    assert list(Echo().generate_iter([])) == []


def test_the_other_defaults():
    model = Echo()
    assert (model.chat, model.compile_s, model.streams, model.describe()) == (False, 0.0, False, {})
    with pytest.raises(ValueError, match=r"^echo \(Echo\) does not score whole documents"):
        model.loglikelihood_rolling([])
    with pytest.raises(TypeError, match="count_tokens"):
        type("Half", (LanguageModel,), {"generate": None, "loglikelihood": None})()
