"""The perplexity task without a model: documents from a .txt file, a folder or a .jsonl file, samples, position
bins, and the metrics aggregated from hand-made answers (perplexity per bin by hand, lm-eval's word perplexity)."""

import json
import math
import re

import pytest

from nsa_eval.tasks.base import DataError, TaskContext
from nsa_eval.tasks.perplexity import Perplexity, bin_label, ratio_stderr, read_documents


def context(max_length=64, limit=None):
    return TaskContext(count_tokens=len, chat=True, max_length=max_length, limit=limit)


@pytest.fixture
def folder(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "b.txt").write_text("Second  document,\nwith two lines.")
    (docs / "a.txt").write_text("First document. Ünïcode bytes.")
    (docs / "notes.md").write_text("not a document")
    return docs


def test_documents_from_a_file_a_folder_and_jsonl(folder, tmp_path):
    assert read_documents(folder) == [("a.txt", "First document. Ünïcode bytes."),
                                      ("b.txt", "Second  document,\nwith two lines.")]
    assert read_documents(folder / "a.txt") == [("a.txt", "First document. Ünïcode bytes.")]
    rows = tmp_path / "docs.jsonl"
    rows.write_text(json.dumps({"text": "one", "id": "first"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(rows) == [("first", "one"), ("row3", "two")]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist; give a .txt file, a folder of .txt files"),
    (lambda p: p, "holds no .txt files"),
    (lambda p: (p / "x.md").write_text("text") and p / "x.md", "unsupported file type '.md'"),
    (lambda p: (p / "e.txt").write_text(" \n") and p / "e.txt", "the document is empty"),
    (lambda p: (p / "r.jsonl").write_text('{"page": "x"}\n') and p / "r.jsonl", "row 1: field 'text' is missing"),
    (lambda p: (p / "r.jsonl").write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n') and p / "r.jsonl",
     "row 2: id '1' is used by an earlier row"),
    (lambda p: (p / "r.jsonl").write_text('{"text": ""}\n') and p / "r.jsonl", "row 1: field 'text' is empty"),
])
def test_bad_documents_are_one_line(tmp_path, make, message):
    with pytest.raises(ValueError, match=message) as error:
        read_documents(make(tmp_path))
    assert "\n" not in str(error.value)


def test_options_are_checked():
    with pytest.raises(ValueError, match="--data perplexity=PATH"):
        Perplexity()
    with pytest.raises(ValueError, match="perplexity.window 'rolling': use disjoint or sliding"):
        Perplexity("x", window="rolling")
    with pytest.raises(ValueError, match="perplexity.stride applies to perplexity.window=sliding"):
        Perplexity("x", stride=512)
    with pytest.raises(ValueError, match="perplexity.bin_width 0"):
        Perplexity("x", bin_width=0)
    with pytest.raises(ValueError, match="leaves no context"):
        Perplexity("x", window="sliding", stride="4k").check_length(4096)


def test_samples_are_whole_documents(folder):
    task = Perplexity(str(folder))
    samples = task.samples(context())
    assert [s.id for s in samples] == ["a.txt", "b.txt"]
    assert all(s.rolling and s.stride is None and not s.generative and s.continuations is None for s in samples)
    assert [s.id for s in task.samples(context(limit=1))] == ["a.txt"]
    assert [s.id for s in Perplexity(str(folder), max_documents=1).samples(context())] == ["a.txt"]
    assert Perplexity(str(folder), window="sliding").samples(context(64))[0].stride == 32
    assert Perplexity(str(folder), window="sliding", stride=16).samples(context(64))[0].stride == 16
    config = task.config()
    assert config["documents"] == 2 and len(config["documents_sha256"]) == 64
    (folder / "b.txt").write_text("changed")
    assert Perplexity(str(folder)).config()["documents_sha256"] != config["documents_sha256"]


def test_bins_and_metrics_by_hand(folder):
    """Two documents' answers (logprob, position): per-bin perplexity = exp(summed NLL / tokens) over the documents;
    word and byte perplexity as lm-eval's weighted_perplexity of (loglikelihood, words or bytes)."""
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    task = Perplexity(str(folder), bin_width=4)
    samples = task.samples(context())
    answers = [[(-1.0, p) for p in range(6)],  # positions 0-5: bins 0 and 4
               [(-2.0, p) for p in range(3)] + [(-0.5, 8)]]  # bins 0 and 8
    records = [{"id": s.id, "scores": task.score(s, a), "details": task.details(s, a)} for s, a in zip(samples, answers)]
    assert records[0]["details"]["bins"] == {"0": [4.0, 4], "4": [2.0, 2]}
    assert records[1]["details"]["bins"] == {"0": [6.0, 3], "8": [0.5, 1]}
    assert records[1]["scores"]["nll"] == pytest.approx(6.5 / 4)
    metrics = task.aggregate(records)
    assert metrics["n"] == 2 and metrics["higher_is_better"]["perplexity"] is False
    assert metrics["metrics"]["perplexity"]["mean"] == pytest.approx(math.exp(12.5 / 10))
    position = metrics["breakdowns"]["position"]
    assert list(position) == ["0", "4", "8"]
    assert position["0"]["perplexity"] == pytest.approx({"mean": math.exp(10 / 7), "n": 2, "tokens": 7,
                                                         "stderr": math.exp(10 / 7) * ratio_stderr([4, 6], [4, 3])})
    assert position["4"]["perplexity"]["mean"] == pytest.approx(math.e) and position["4"]["perplexity"]["n"] == 1
    assert position["8"]["nll"]["mean"] == pytest.approx(0.5)
    pairs = [(-6.0, sample.prompt) for sample in samples[:1]] + [(-6.5, samples[1].prompt)]
    words = [(ll, len(re.split(r"\s+", text))) for ll, text in pairs]
    size = [(ll, len(text.encode("utf-8"))) for ll, text in pairs]
    assert metrics["metrics"]["word_perplexity"]["mean"] == pytest.approx(weighted_perplexity(words))
    assert metrics["metrics"]["byte_perplexity"]["mean"] == pytest.approx(weighted_perplexity(size))
    assert metrics["metrics"]["bits_per_byte"]["mean"] == pytest.approx(bits_per_byte(size))


def test_ratio_stderr_and_bin_labels():
    assert ratio_stderr([1.0], [2.0]) == 0.0
    assert ratio_stderr([2.0, 4.0], [1.0, 2.0]) == 0.0  # every document at the same rate
    assert ratio_stderr([1.0, 3.0], [1.0, 1.0]) == pytest.approx(1.0)  # the standard error of the mean of 1 and 3
    assert [bin_label(s, 1024) for s in (0, 1024, 7168)] == ["0-1k", "1k-2k", "7k-8k"]
    assert bin_label(512, 512) == "512-1k" and bin_label(16, 16) == "16-32"
