"""Needle in a haystack: grid, haystack, needle placement and prompt length with a real tokenizer."""

import pytest

from token_count import counter

from nsa_eval.tasks.base import TaskContext
from nsa_eval.tasks.niah import _REFLECTIONS, NeedleInAHaystack, filler_sentences, haystack_sentences


def context(tokenizer, chat=False, max_length=8192, limit=None):
    return TaskContext(count_tokens=counter(tokenizer), chat=chat, max_length=max_length, limit=limit)


def haystack_of(prompt):
    text = prompt if isinstance(prompt, str) else prompt[0]["content"]
    return text.split("<text>\n", 1)[1].split("\n</text>", 1)[0]


def test_grid_has_every_cell_with_a_fresh_value(tokenizer):
    task = NeedleInAHaystack(lengths=[256, 512], depths=[0, 50, 100], samples_per_cell=2, seed=3)
    samples = task.samples(context(tokenizer))
    cells = {(s.breakdown["length"], s.breakdown["depth"]) for s in samples}
    assert cells == {(n, d) for n in (256, 512) for d in (0, 50, 100)}
    assert len(samples) == 12 and len({s.id for s in samples}) == 12
    values = [s.target for s in samples]
    assert len(set(values)) == len(values), "every sample needs its own random value"
    assert all(v.isdigit() and len(v) == 7 for v in values)
    again = NeedleInAHaystack(lengths=[256, 512], depths=[0, 50, 100], samples_per_cell=2, seed=3)
    assert [s.prompt for s in again.samples(context(tokenizer))] == [s.prompt for s in samples], "seeded"
    other = NeedleInAHaystack(lengths=[256], depths=[0], seed=4).samples(context(tokenizer))
    assert other[0].target != samples[0].target


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [300, 1024, pytest.param(2048, marks=pytest.mark.slow)])
def test_prompt_length_within_one_percent(tokenizer, chat, length):
    count = counter(tokenizer)
    task = NeedleInAHaystack(lengths=[length], depths=[0, 37, 100], seed=1)
    for sample in task.samples(context(tokenizer, chat=chat)):
        assert abs(count(sample.prompt) - length) <= 0.01 * length, (sample.id, count(sample.prompt))


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_sits_at_the_asked_depth_on_a_sentence_boundary(tokenizer, depth):
    count = counter(tokenizer)
    sample = NeedleInAHaystack(lengths=[2048], depths=[depth], seed=2).samples(context(tokenizer))[0]
    haystack = haystack_of(sample.prompt)
    needle = f"is {sample.target}."
    start = haystack.index("The special magic number for")
    assert needle in haystack[start:start + 80]
    before, after = haystack[:start], haystack[start:]
    # a sentence boundary: the needle starts the text or follows a full stop
    assert before == "" or before.endswith(". ")
    position = (count(before) - 1) / (count(haystack) - 1)  # -1: the BOS token each count adds
    # the nearest boundary is at most one filler sentence (~15 tokens of ~2000) from the exact depth
    assert abs(position - depth / 100) <= 0.012, position
    if depth == 100:
        assert after.rstrip().endswith(f"{sample.target}.")


def test_score_finds_the_value_anywhere_in_the_response(tokenizer):
    task = NeedleInAHaystack(lengths=[256], depths=[50])
    sample = task.samples(context(tokenizer))[0]
    value = sample.target
    assert task.score(sample, [f"The special magic number is {value}."]) == {"accuracy": 1.0}
    grouped = f"{value[0]},{value[1:4]},{value[4:]}"
    assert task.score(sample, [f"It is {grouped}"]) == {"accuracy": 1.0}
    assert task.score(sample, ["I could not find it."]) == {"accuracy": 0.0}
    assert task.score(sample, [str(int(value) + 1)]) == {"accuracy": 0.0}
    assert task.score(sample, [value, "no"]) == {"accuracy": 0.5}


def test_haystack_folder_is_used_in_order(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("Alpha one is here. Alpha two follows! " * 200)
    (tmp_path / "b.txt").write_text("Beta sentence number one? Beta two.")
    sentences = haystack_sentences(tmp_path)
    assert sentences[:2] == ["Alpha one is here.", "Alpha two follows!"]
    assert sentences[-2:] == ["Beta sentence number one?", "Beta two."]
    sample = NeedleInAHaystack(lengths=[512], depths=[50], haystack_dir=str(tmp_path)).samples(context(tokenizer))[0]
    assert "Alpha" in haystack_of(sample.prompt) and "The special magic number" in haystack_of(sample.prompt)


def test_generated_filler_is_varied():
    import random

    stream = filler_sentences(random.Random(0))
    sentences = [next(stream) for _ in range(500)]
    # a fifth are short reflections drawn from a small set; the rest are composed and almost never repeat
    composed = [s for s in sentences if s not in _REFLECTIONS]
    assert len(composed) > 350 and len(set(composed)) > 0.95 * len(composed)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lengths": [64]}, "at least 128"),
        ({"depths": [120]}, "between 0 and 100"),
        ({"samples_per_cell": 0}, "at least 1"),
        ({"haystack_dir": "/nonexistent/folder"}, "not a folder"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        NeedleInAHaystack(**options)


def test_grid_longer_than_max_length_is_refused(tokenizer):
    task = NeedleInAHaystack(lengths=[1024, 4096])
    with pytest.raises(ValueError, match="lower niah.lengths or raise --max-length"):
        task.samples(context(tokenizer, max_length=2048))
