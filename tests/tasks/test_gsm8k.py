"""GSM8K on real rows: lm-eval's gsm8k_cot prompt, strict and flexible extraction, number comparison."""

import json

import pytest

from nsa_eval.tasks.base import DataError, TaskContext
from nsa_eval.tasks.gsm8k import GSM8K, flexible_answer, strict_answer


def context(chat=False, limit=None):
    return TaskContext(count_tokens=lambda prompt: len(str(prompt)), chat=chat, max_length=4096, limit=limit)


@pytest.fixture
def gsm8k_path(shared_data):
    return str(shared_data / "gsm8k" / "test.jsonl")


FIRST_QUESTION = (
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?"
)


def test_eight_shot_prompt_matches_gsm8k_cot(gsm8k_path):
    task = GSM8K(data_path=gsm8k_path)
    sample = task.samples(context(limit=1))[0]
    assert sample.prompt.startswith(
        "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?\n"
        "A: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.\n\n"
        "Q: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n"
        "A: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n"
    )
    assert sample.prompt.endswith(
        "A: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        f"left. 23 - 15 is 8. The answer is 8.\n\nQ: {FIRST_QUESTION}\nA:"
    )
    assert sample.prompt.count("\n\nQ: ") == 8 and sample.prompt.count("The answer is") == 8
    assert sample.target == "18" and sample.stop == ["Q:", "</s>", "<|im_end|>"] and sample.temperature == 0
    assert task.config()["num_fewshot"] == 8


def test_chat_models_get_the_zero_shot_prompt_by_default(gsm8k_path):
    task = GSM8K(data_path=gsm8k_path)
    sample = task.samples(context(chat=True, limit=1))[0]
    assert sample.prompt == [{"role": "user", "content": f"Q: {FIRST_QUESTION}\nA: Let's think step by step."}]
    assert task.config() == {"data": gsm8k_path, "num_fewshot": 0, "max_new_tokens": 512, "chat": True}
    shots = GSM8K(data_path=gsm8k_path, num_fewshot=2).samples(context(chat=True, limit=1))[0].prompt
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant", "user"]
    assert shots[1]["content"].endswith("The answer is 6.") and shots[-1]["content"] == f"Q: {FIRST_QUESTION}\nA:"


def test_gold_written_as_a_model_would_scores_one_and_a_wrong_answer_zero_on_every_real_row(gsm8k_path):
    for chat in (False, True):
        task = GSM8K(data_path=gsm8k_path)
        samples = task.samples(context(chat=chat))
        assert len(samples) == 1319
        for sample in samples:
            gold = sample.target
            assert task.score(sample, [f"Let me add the numbers. The answer is {gold}."]) == {
                "strict_match": 1.0,
                "flexible_extract": 1.0,
            }
            wrong = str(int(gold.replace(",", "")) + 1)
            assert task.score(sample, [f"So 3 + 4 = 7. The answer is {wrong}."]) == {
                "strict_match": 0.0,
                "flexible_extract": 0.0,
            }


def test_strict_and_flexible_extraction_follow_lm_eval():
    assert strict_answer("So 2 + 3 = 5. The answer is 1,080.\n") == "1,080"  # the final "." is the pattern's own
    assert strict_answer("The answer is $18.") is None  # "$" is outside the strict pattern
    assert strict_answer("no cue here 42") is None
    assert flexible_answer("It costs $1,080. Then 3 more") == "3"
    assert flexible_answer("It costs $1,080.") == "$1,080."
    assert flexible_answer("-7 degrees") == "-7"
    assert flexible_answer("none") is None


def test_comparison_drops_commas_dollars_and_a_final_period(gsm8k_path):
    task = GSM8K(data_path=gsm8k_path)
    samples = {s.target: s for s in task.samples(context())}
    big = next(s for t, s in samples.items() if int(t) >= 1000)
    formatted = f"{int(big.target):,}"
    assert task.score(big, [f"The answer is {formatted}."])["strict_match"] == 1.0
    assert task.score(big, [f"That makes ${formatted}."]) == {"strict_match": 0.0, "flexible_extract": 1.0}
    eighteen = samples["18"]
    assert task.score(eighteen, ["#### 18"]) == {"strict_match": 0.0, "flexible_extract": 1.0}
    assert task.score(eighteen, ["The answer is 18.00."])["strict_match"] == 0.0  # 8-shot: "18.00" is not "18"
    zero_shot = GSM8K(data_path=gsm8k_path, num_fewshot=0)
    eighteen = next(s for s in zero_shot.samples(context()) if s.target == "18")
    assert zero_shot.score(eighteen, ["The answer is 18.00."])["strict_match"] == 1.0  # 0-shot drops ".00"
    assert task.details(eighteen, ["The answer is 18. Then 20"]) == {"strict": "18.", "flexible": "20"}


def test_a_row_without_a_final_answer_is_a_data_error(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gsm\.jsonl: row 1: field 'answer' has no '#### N'"):
        GSM8K(data_path=str(path)).samples(context())
    with pytest.raises(ValueError, match="num_fewshot 9"):
        GSM8K(num_fewshot=9)
