"""--task-option values are read as the type each task's option takes (its constructor's annotations), and the
task names and lm-eval suggestions are matched without case and without far-fetched guesses."""

import pytest

from nsa_eval.registry import TASKS
from nsa_eval.util import did_you_mean
from nsa_eval.task_options import typed_options


@pytest.mark.parametrize("task, texts, expected", [
    ("niah", {"lengths": "512"}, {"lengths": [512]}),  # a single number for a list option (was 'int' not iterable)
    ("niah", {"depths": "0,50"}, {"depths": [0, 50]}),
    ("humaneval", {"n_samples": "2", "k": "1,2", "temperature": "0.8", "timeout_s": "2"},
     {"n_samples": 2, "k": [1, 2], "temperature": 0.8, "timeout_s": 2.0}),
    ("humaneval", {"k": "1", "top_p": "none"}, {"k": 1, "top_p": None}),
    ("longbench", {"subsets": "qasper,trec", "longbench_e": "true"}, {"subsets": ["qasper", "trec"], "longbench_e": True}),
    ("longbench", {"subsets": "table2"}, {"subsets": "table2"}),
    ("aime", {"temperature": "0.7", "n_samples": "4"}, {"temperature": 0.7, "n_samples": 4}),
    ("mmlu", {"variant": "generative", "num_fewshot": "0"}, {"variant": "generative", "num_fewshot": 0}),
])
def test_values_take_their_options_type(task, texts, expected):
    assert typed_options(task, TASKS[task], texts) == expected
    TASKS[task](**{**expected, **({"allow_code_execution": True} if task == "humaneval" else {})})  # and the task takes them


@pytest.mark.parametrize("task, key, text, message", [
    ("aime", "temperature", "hot", "--task-option aime.temperature=hot: temperature takes a number, e.g. aime.temperature=0.7"),
    ("aime", "n_samples", "2.5", "n_samples takes a whole number, e.g. aime.n_samples=16"),
    ("aime", "temperature", "nan", "temperature takes a number"),
    ("mmlu", "num_fewshot", "abc", "num_fewshot takes a whole number, e.g. mmlu.num_fewshot=5"),
    ("gsm8k", "num_fewshot", "8.0", "num_fewshot takes a whole number"),
    ("niah", "lengths", "1x", "lengths takes comma-separated token counts (4096 or 4k), e.g. niah.lengths=1024,2048,4096"),
    ("longbench", "longbench_e", "maybe", "longbench_e takes true or false"),
])
def test_a_value_of_the_wrong_type_names_the_type_and_an_example(task, key, text, message):
    with pytest.raises(ValueError) as caught:
        typed_options(task, TASKS[task], {key: text})
    assert str(caught.value).startswith(f"--task-option {task}.{key}={text}: ") and message in str(caught.value)


def test_did_you_mean_ignores_case_and_skips_far_matches():
    assert did_you_mean("NIAH", ["niah", "mmlu"]) == " Did you mean 'niah'?"
    assert did_you_mean("Gsm8K", ["gsm8k"]) == " Did you mean 'gsm8k'?"
    assert did_you_mean("hellaswg", ["hellaswag", "xlsum_tasks"], cutoff=0.75) == " Did you mean 'hellaswag'?"
    # lm-eval's thousands of names: the bridge asks for a close match only (was: 'nosuchtask' -> 'xlsum_tasks')
    assert did_you_mean("nosuchtask", ["xlsum_tasks", "hellaswag"], cutoff=0.75) == ""
