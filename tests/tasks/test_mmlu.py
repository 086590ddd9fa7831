"""MMLU on real rows: lm-eval's prompt, letter log-likelihoods, the generative letter filter, micro/macro accuracy."""

import json

import pytest

from nsa_eval.tasks.base import DataError, TaskContext
from nsa_eval.tasks.mmlu import CATEGORIES, MMLU, extract_letter


def context(chat=False, limit=None, seed=0):
    return TaskContext(count_tokens=lambda prompt: len(str(prompt)), chat=chat, max_length=4096, seed=seed, limit=limit)


@pytest.fixture
def mmlu_rows(shared_data):
    path = shared_data / "mmlu_stem" / "test.jsonl"
    return path, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def split_folder(tmp_path, test_rows, dev_rows):
    for name, rows in (("test", test_rows), ("dev", dev_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(tmp_path)


def test_prompt_is_lm_eval_default_mmlu_with_dev_shots(tmp_path, mmlu_rows):
    _, rows = mmlu_rows
    biology = [r for r in rows if r["type"] == "college_biology"]
    task = MMLU(data_path=split_folder(tmp_path, biology[:1], biology[1:3]), num_fewshot=2)
    (sample,) = task.samples(context())
    assert sample.prompt == (
        "The following are multiple choice questions (with answers) about college biology.\n\n"
        "A frameshift mutation is created when\n"
        "A. telomeric sequences are removed from DNA\n"
        "B. a codon's nucleotide sequence changes so that it calls for production of a different amino acid than "
        "the original one\n"
        "C. a base pair is either inserted or deleted in a gene\n"
        "D. a codon's nucleotide sequence is changed so that instead of coding for a given amino acid it acts to "
        "terminate translation\n"
        "Answer: C\n\n"
        "To prevent desiccation and injury, the embryos of terrestrial vertebrates are encased within a fluid "
        "secreted by the\n"
        "A. amnion\nB. chorion\nC. allantois\nD. yolk sac\n"
        "Answer: A\n\n"
        "Based on the characteristic population curves that result from plotting population growth of a species, "
        "the most effective means of controlling the mosquito population is to\n"
        "A. maintain the population at a point corresponding to the midpoint of its logistic curve\n"
        "B. opt for zero population control once the K value of the curve has been reached\n"
        "C. reduce the carrying capacity cif the environment to lower the K value\n"
        "D. increase the mortality rate\n"
        "Answer:"
    )
    assert sample.continuations == [" A", " B", " C", " D"]
    assert sample.target == "C" and sample.breakdown == {"subject": "college_biology"}
    assert task.config()["shots_from"] == "dev"


def test_chat_prompt_is_multiturn_and_letters_lose_the_space(tmp_path, mmlu_rows):
    _, rows = mmlu_rows
    biology = [r for r in rows if r["type"] == "college_biology"]
    task = MMLU(data_path=split_folder(tmp_path, biology[:1], biology[1:3]), num_fewshot=2)
    (sample,) = task.samples(context(chat=True))
    roles = [m["role"] for m in sample.prompt]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sample.prompt[0]["content"] == "The following are multiple choice questions (with answers) about college biology.\n\n"
    assert sample.prompt[2]["content"] == "C" and sample.prompt[4]["content"] == "A"
    assert sample.prompt[-1]["content"].endswith("D. increase the mortality rate\nAnswer:")
    assert sample.continuations == ["A", "B", "C", "D"]
    assert task.config()["chat"] is True


def test_gold_letter_scores_one_and_others_zero_on_every_real_row(mmlu_rows):
    path, rows = mmlu_rows
    task = MMLU(data_path=str(path))
    samples = task.samples(context())
    assert len(samples) == len(rows) == 3018
    for sample in samples:
        gold = "ABCD".index(sample.target)
        likes_gold = [(-5.0, False)] * 4
        likes_gold[gold] = (-0.1, True)
        likes_other = [(-5.0, False)] * 4
        likes_other[(gold + 1) % 4] = (-0.1, True)
        assert task.score(sample, likes_gold) == {"accuracy": 1.0}
        assert task.score(sample, likes_other) == {"accuracy": 0.0}


def test_test_only_shots_come_from_the_same_subject_without_the_item_and_follow_the_seed(mmlu_rows):
    path, rows = mmlu_rows
    biology_questions = {r["question"].strip() for r in rows if r["type"] == "college_biology"}
    first = MMLU(data_path=str(path), subjects="college_biology").samples(context(limit=20))
    again = MMLU(data_path=str(path), subjects="college_biology").samples(context(limit=20))
    other_seed = MMLU(data_path=str(path), subjects="college_biology", seed=1).samples(context(limit=20))
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other_seed]
    for sample in first:
        blocks = sample.prompt.split("\n\n")[1:]  # the description, then 5 shots, then the item
        assert len(blocks) == 6
        item = blocks[-1].split("\nA. ")[0]
        shots = [b.split("\nA. ")[0] for b in blocks[:-1]]
        assert item not in shots and set(shots) <= biology_questions


def test_generative_variant_reads_the_letter_as_lm_eval_mmlu_generative(tmp_path, mmlu_rows):
    _, rows = mmlu_rows
    biology = [r for r in rows if r["type"] == "college_biology"]
    task = MMLU(data_path=split_folder(tmp_path, biology[:1], biology[1:6]), variant="generative")
    (sample,) = task.samples(context(chat=True))
    assert sample.continuations is None and sample.stop == ["\n"]
    for right in [" C", "C", "(C)", "c)", "The answer is C.", "Answer: C", "option C"]:
        assert task.score(sample, [right]) == {"accuracy": 1.0}, right
    # a wrong letter, no letter, and lm-eval's filter rejecting a letter followed by more words
    for wrong in [" B", "I think so", "C. reduce the carrying capacity", "", "\nC"]:
        assert task.score(sample, [wrong]) == {"accuracy": 0.0}, wrong
    assert task.details(sample, ["The answer is (C)"]) == {"chosen": "C"}
    assert extract_letter("D\nbecause A is wrong") == "D"


def test_aggregate_gives_micro_and_macro_accuracy():
    task = MMLU()
    records = [{"scores": {"accuracy": a}, "breakdown": {"subject": s}} for s, a in
               [("algebra", 1.0), ("algebra", 1.0), ("algebra", 1.0), ("algebra", 0.0), ("biology", 0.0), ("biology", 1.0)]]
    result = task.aggregate(records)
    assert result["metrics"]["accuracy"]["mean"] == pytest.approx(4 / 6)
    assert result["metrics"]["accuracy_macro"]["mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert result["breakdowns"]["subject"]["algebra"]["accuracy"]["mean"] == pytest.approx(0.75)


def test_categories_weight_subjects_as_lm_eval_groups(mmlu_rows):
    """Category accuracy = lm-eval's mmlu_<category> group: subject means weighted by size, pooled stderr."""
    metrics = pytest.importorskip("lm_eval.api.metrics")
    import importlib.util
    from pathlib import Path

    import lm_eval

    spec = importlib.util.spec_from_file_location(
        "mmlu_configs", Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "_generate_configs.py")
    configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configs)
    assert CATEGORIES == configs.SUBJECTS  # the 57 subjects and their groups, as lm-eval has them

    _, rows = mmlu_rows  # real STEM subjects (18, unequal sizes), scored with a deterministic pattern
    records = [{"scores": {"accuracy": float((i * 7) % 5 < 3)}, "breakdown": {"subject": r["type"]}}
               for i, r in enumerate(rows)]
    for k, subject in enumerate(["philosophy", "world_religions", "sociology", "econometrics", "virology", "marketing"]):
        records += [{"scores": {"accuracy": float(i % (k + 2) == 0)}, "breakdown": {"subject": subject}}
                    for i in range(11 + 13 * k)]
    records.append({"scores": {"accuracy": 1.0}, "breakdown": {"subject": "made_up_subject"}})
    result = MMLU().aggregate(records)
    subjects = result["breakdowns"]["subject"]
    assert list(result["breakdowns"]["category"]) == ["stem", "humanities", "social_sciences", "other"]
    for category, cell in result["breakdowns"]["category"].items():
        members = [s for s in subjects if CATEGORIES.get(s) == category]
        means = [subjects[s]["accuracy"]["mean"] for s in members]
        stderrs = [subjects[s]["accuracy"]["stderr"] for s in members]
        sizes = [subjects[s]["accuracy"]["n"] for s in members]
        assert cell["accuracy"]["mean"] == pytest.approx(metrics.aggregate_subtask_metrics(means, sizes, True))
        assert cell["accuracy"]["stderr"] == pytest.approx(float(metrics.pooled_sample_stderr(stderrs, sizes)))
        assert cell["accuracy"]["n"] == sum(sizes)
        # weighting by size makes it the mean over the category's questions
        own = [r["scores"]["accuracy"] for r in records if CATEGORIES.get(r["breakdown"]["subject"]) == category]
        assert cell["accuracy"]["mean"] == pytest.approx(sum(own) / len(own))
        assert result["metrics"][f"accuracy_{category}"] == cell["accuracy"]
    assert len({r["breakdown"]["subject"] for r in records if r["breakdown"]["subject"] in CATEGORIES}) == 18 + 6


def test_bad_options_and_rows_are_one_line_errors(tmp_path, mmlu_rows):
    path, rows = mmlu_rows
    with pytest.raises(ValueError, match="variant 'cloze' is unknown"):
        MMLU(variant="cloze")
    with pytest.raises(ValueError, match="subjects not in the data: astrology"):
        MMLU(data_path=str(path), subjects="astrology").samples(context())
    three_choices = dict(rows[0], choices=rows[0]["choices"][:3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n" + json.dumps(three_choices) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl \[test\]: row 2: MMLU needs 4 choices"):
        MMLU(data_path=str(bad)).samples(context())
    missing_subject = {k: v for k, v in rows[0].items() if k != "type"}
    bad.write_text(json.dumps(missing_subject) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: field 'subject' is missing"):
        MMLU(data_path=str(bad)).samples(context())


def test_a_subject_with_too_few_shot_rows_records_the_fewest_shots_used(tmp_path, mmlu_rows):
    """One test file, no dev split: a subject of 3 rows asks each with its 2 other rows; run.json's config says so
    (`fewest_shots`), and the report's column head says 2-5-shot, never beside the paper's 5-shot number."""
    from nsa_eval.report.runs import TaskResult
    from nsa_eval.report.score_tables import setting

    _, rows = mmlu_rows
    biology = [r for r in rows if r["type"] == "college_biology"][:3]
    physics = [r for r in rows if r["type"] == "college_physics"][:8]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in biology + physics), encoding="utf-8")
    task = MMLU(data_path=str(path))
    samples = task.samples(context())
    shots = {s.id: s.prompt.count("\nAnswer: ") for s in samples}  # a shot ends "Answer: X", the question "Answer:"
    assert {shots[f"college_biology/{i}"] for i in range(3)} == {2} and {shots[f"college_physics/{i}"] for i in range(8)} == {5}
    config = task.config()
    assert config["num_fewshot"] == 5 and config["fewest_shots"] == 2
    result = TaskResult("mmlu", "1", "acc", 11, {"acc": {"mean": 0.5, "stderr": 0.1}}, {}, {}, config, None)
    assert setting(result) == "2-5-shot acc"
    whole = MMLU(data_path=str(path), subjects="college_physics")
    whole.samples(context())
    assert "fewest_shots" not in whole.config()  # every sample had its 5 shots: the config (and hash) as before
