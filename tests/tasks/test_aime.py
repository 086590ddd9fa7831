"""AIME 2024 on real rows: prompts, answer extraction, math-verify checking, accuracy and unbiased pass@k."""

import itertools
import json

import pytest

from nsa_eval.tasks.aime import AIME, final_answer, last_boxed
from nsa_eval.tasks.base import DataError, TaskContext, pass_at_k


def context(chat=True, max_length=40000, limit=None):
    return TaskContext(count_tokens=lambda prompt: len(str(prompt)) // 4, chat=chat, max_length=max_length, limit=limit)


@pytest.fixture
def aime_path(shared_data):
    return str(shared_data / "aime24" / "test.jsonl")


def test_prompts_sampling_settings_and_targets(aime_path):
    task = AIME(data_path=aime_path)
    samples = task.samples(context())
    assert len(samples) == 30 and samples[0].id == "60" and samples[0].target == "204"
    first = samples[0]
    assert first.prompt[0]["role"] == "user"
    assert first.prompt[0]["content"].startswith("Every morning Aya goes for a $9$-kilometer-long walk")
    assert first.prompt[0]["content"].endswith(
        "spent in the coffee shop.\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert (first.n, first.temperature, first.top_p, first.max_new_tokens) == (16, 0.7, 0.95, 8192)
    plain = AIME(data_path=aime_path, max_new_tokens=16384).samples(context(chat=False, limit=1))[0]
    assert plain.prompt.startswith("Problem: Every morning") and plain.prompt.endswith("\\boxed{}.\n\nSolution:")
    assert plain.max_new_tokens == 16384


def test_boxed_gold_scores_one_and_a_wrong_answer_zero_on_every_real_row(aime_path):
    task = AIME(data_path=aime_path, n_samples=2)
    for sample in task.samples(context()):
        gold = sample.target
        right = f"Adding up the cases gives {int(gold)}.\nSo the answer is $\\boxed{{{int(gold)}}}$."
        wrong = f"... therefore the answer is \\boxed{{{(int(gold) + 1) % 1000}}}"
        assert task.score(sample, [right, right])["accuracy"] == 1.0
        assert task.score(sample, [wrong, wrong])["accuracy"] == 0.0
        assert task.score(sample, [right, wrong]) == {"accuracy": 0.5, "pass@1": 0.5, "pass@2": 1.0}


def test_answer_extraction_prefers_the_last_box_then_the_last_integer():
    assert last_boxed(r"first \boxed{12} then \boxed{\frac{1}{2}} and \boxed{}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None
    assert final_answer(r"We get 3 cases, so 45 in total. \boxed{045}") == "045"
    assert final_answer("So 17 + 8 = 25 and the answer is 1,025") == "1025"
    assert final_answer("no digits at all") is None


def test_math_verify_equivalence(aime_path):
    task = AIME(data_path=aime_path, n_samples=1)
    sample = next(s for s in task.samples(context()) if s.target == "025")  # zero-padded reference
    for right in [r"\boxed{25}", r"\boxed{025}", r"\boxed{\frac{50}{2}}", "the final count is 25"]:
        assert task.score(sample, [right])["accuracy"] == 1.0, right
    for wrong in [r"\boxed{26}", r"\boxed{25} is wrong, it is \boxed{52}", "nothing"]:
        assert task.score(sample, [wrong])["accuracy"] == 0.0, wrong


def test_pass_at_k_is_the_unbiased_estimator():
    # brute force: the share of k-subsets of n samples with at least one correct
    for n, c, k in [(16, 3, 4), (16, 0, 8), (5, 5, 2), (8, 1, 1), (10, 7, 5)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_aggregate_reports_mean_accuracy_and_pass_at_k(aime_path):
    task = AIME(data_path=aime_path, n_samples=4)
    samples = task.samples(context(limit=2))
    records = [
        {"scores": task.score(samples[0], [r"\boxed{204}", "1", "2", "3"]), "breakdown": {}},
        {"scores": task.score(samples[1], [r"\boxed{113}"] * 4), "breakdown": {}},
    ]
    metrics = task.aggregate(records)["metrics"]
    assert metrics["accuracy"]["mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert metrics["pass@4"]["mean"] == pytest.approx(1.0)
    assert metrics["pass@2"]["mean"] == pytest.approx((0.5 + 1.0) / 2)


def test_the_generation_budget_is_recorded(aime_path):
    """The paper's Table 3 is keyed by generation budget: run.json (config) and metrics.json (aggregate) hold it."""
    for budget in (8192, 16384):
        task = AIME(data_path=aime_path, n_samples=1, max_new_tokens=budget)
        task.samples(context(limit=1, max_length=32768))
        assert task.config()["generation_budget"] == budget
        assert task.aggregate([{"scores": {"accuracy": 1.0}, "breakdown": {}}])["generation_budget"] == budget


def test_limits_and_bad_rows(aime_path, tmp_path):
    with pytest.raises(ValueError, match="more than the model's max length 8192"):
        AIME(data_path=aime_path).samples(context(max_length=8192))
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"id": 1, "problem": "p", "answer": 3.5}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"aime\.jsonl: row 1: field 'answer' should be a string or an integer"):
        AIME(data_path=str(path)).samples(context())
    hub_schema = tmp_path / "hub.jsonl"  # Maxwell-Jia/AIME_2024's field names
    hub_schema.write_text(json.dumps({"ID": "2024-I-1", "Problem": "p", "Answer": 33}) + "\n", encoding="utf-8")
    (sample,) = AIME(data_path=str(hub_schema)).samples(context())
    assert (sample.id, sample.target) == ("2024-I-1", "33")
