"""LongBench metrics: hand-computed values (Chinese included) and the reference scorer's numbers.

The reference's ROUGE-L comes from the `rouge` package (a dev dependency here, used only as the oracle);
its recursion-depth failure is checked in a subprocess that calls it the way LongBench's eval.py does.
"""

import json
import random
import subprocess
import sys
import textwrap

import jieba
import pytest
from rouge import Rouge

from nsa_eval.tasks.longbench_metrics import (
    classification,
    code_similarity,
    count,
    fuzz_ratio,
    qa_f1,
    qa_f1_zh,
    retrieval,
    retrieval_zh,
    rouge_l,
    rouge_l_zh,
    score_prediction,
)


def reference_rouge_l(prediction, reference):
    """LongBench's rouge_score: the package's ROUGE-L F, 0 when it raises."""
    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0


def test_qa_f1_english_by_hand():
    # "The Eiffel Tower, Paris" -> "eiffel tower paris"; 2 shared of 3 predicted, 2 of 2 reference
    assert qa_f1("The Eiffel Tower, Paris", "eiffel tower") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert qa_f1("Tomas", "Tomas, the captain of a fishing boat") == pytest.approx(2 * 1 * (1 / 5) / (1 + 1 / 5))
    assert qa_f1("An answer", "the") == 0.0  # nothing left of "the" after dropping articles


def test_qa_f1_chinese_by_hand():
    assert list(jieba.cut("位于北京", cut_all=False)) == ["位于", "北京"]
    assert list(jieba.cut("北京北部", cut_all=False)) == ["北京", "北部"]
    assert qa_f1_zh("位于北京", "北京北部") == pytest.approx(0.5)  # one shared word of two each
    assert qa_f1_zh("北京北部。", "北京北部") == pytest.approx(1.0)  # punctuation-only words dropped


def test_rouge_l_by_hand():
    # one sentence each; words as sets: m = n = 5 ({the, cat, was/sat, on, mat}); LCS words {the, cat, on, mat}
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(
        2 * (0.8 * 0.8) / (0.8 + 0.8 + 1e-8), abs=1e-12
    )
    # two sentences each: union of the per-pair LCS words {a, b} and {d, f}; m = n = 6
    assert rouge_l("a b c. d e f", "a b x. d y f") == pytest.approx(2 * (4 / 6) ** 2 / (8 / 6 + 1e-8), abs=1e-12)
    assert rouge_l("the the the", "the") == pytest.approx(2 / (2 + 1e-8), abs=1e-12)
    assert rouge_l("", "a summary") == 0.0 and rouge_l("...", "a summary") == 0.0 and rouge_l("x", "") == 0.0


def test_rouge_l_chinese_by_hand():
    assert list(jieba.cut("会议决定推迟发布", cut_all=False)) == ["会议", "决定", "推迟", "发布"]
    assert list(jieba.cut("会议决定推迟一周发布", cut_all=False)) == ["会议", "决定", "推迟", "一周", "发布"]
    recall, precision = 4 / 5, 4 / 4
    assert rouge_l_zh("会议决定推迟发布", "会议决定推迟一周发布") == pytest.approx(
        2 * recall * precision / (recall + precision + 1e-8), abs=1e-12
    )


def test_rouge_l_equals_the_rouge_package_on_random_texts():
    rng = random.Random(0)
    vocabulary = ["the", "cat", "sat", "on", "mat", "a", "dog", ".", "..", "  ", "x", "y", "z", "of", "and", "\n"]
    for _ in range(1500):
        prediction = " ".join(rng.choice(vocabulary) for _ in range(rng.randrange(0, 50)))
        reference = " ".join(rng.choice(vocabulary) for _ in range(rng.randrange(0, 50)))
        assert rouge_l(prediction, reference) == reference_rouge_l(prediction, reference), (prediction, reference)


def test_rouge_l_zh_equals_the_reference_on_random_chinese():
    rng = random.Random(1)
    pieces = ["会议", "决定", "推迟", "发布", "测试", "完成", "我们", "下周", "新版本", "。", "，", "."]
    for _ in range(200):
        prediction = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        reference = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        expected = reference_rouge_l(" ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference)))
        assert rouge_l_zh(prediction, reference) == expected, (prediction, reference)


EVAL_PY_LIKE = textwrap.dedent(
    """
    import json, sys
    import jieba
    from rouge import Rouge

    def rouge_score(prediction, ground_truth, **kwargs):
        rouge = Rouge()
        try:
            scores = rouge.get_scores([prediction], [ground_truth], avg=True)
        except:
            return 0.0
        return scores["rouge-l"]["f"]

    def rouge_zh_score(prediction, ground_truth, **kwargs):
        prediction = " ".join(list(jieba.cut(prediction, cut_all=False)))
        ground_truth = " ".join(list(jieba.cut(ground_truth, cut_all=False)))
        return rouge_score(prediction, ground_truth)

    dataset2metric = {"gov_report": rouge_score, "vcsum": rouge_zh_score}

    def scorer(dataset, predictions, answers, all_classes):
        total_score = 0.
        for (prediction, ground_truths) in zip(predictions, answers):
            score = 0.
            for ground_truth in ground_truths:
                score = max(score, dataset2metric[dataset](prediction, ground_truth, all_classes=all_classes))
            total_score += score
        return total_score / len(predictions)

    if __name__ == "__main__":
        results = []
        for dataset, prediction, answer in json.loads(sys.stdin.read()):
            results.append(scorer(dataset, [prediction], [[answer]], None))
        print(json.dumps(results))
    """
)


@pytest.mark.slow
def test_long_sentences_score_zero_where_the_reference_scorer_overflows_its_stack(tmp_path):
    """The package back-tracks recursively; in eval.py a path of 990+ steps raises and scores 0."""

    def case(extra_words):  # path: left through every predicted word, then one diagonal step
        reference = " ".join(f"r{i}" for i in range(10)) + " shared"
        prediction = "shared " + " ".join(f"h{i}" for i in range(extra_words))
        return prediction, reference

    cases = [("gov_report", *case(n)) for n in (988, 989, 990)] + [("vcsum", *case(n)) for n in (987, 988, 989)]
    script = tmp_path / "eval_like.py"
    script.write_text(EVAL_PY_LIKE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], input=json.dumps(cases), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    ours = [score_prediction(subset, prediction, [answer], None) for subset, prediction, answer in cases]
    assert ours == expected
    assert [value > 0 for value in ours] == [True, True, False, True, True, False]


def test_classification_by_hand_including_the_reference_quirk():
    classes = ["财经", "体育", "教育", "体育彩票"]
    assert classification("体育", "体育", all_classes=classes) == 1.0
    assert classification("这是体育彩票新闻", "体育", all_classes=classes) == 0.5  # two classes named
    assert classification("财经", "体育", all_classes=classes) == 0.0
    # "Other" and "location" are parts of the answer: the first is removed, and the removal makes the
    # reference skip "location", which stays in the list: 1/2 instead of 1
    assert classification("Other location", "Other location", all_classes=["Other", "location", "Other location"]) == 0.5


def test_retrieval_count_and_code_similarity_by_hand():
    assert retrieval("Paragraph 2", "Paragraph 2") == 1.0
    assert retrieval("Paragraph 2, or maybe Paragraph 1", "Paragraph 2") == 0.5
    assert retrieval("I do not know", "Paragraph 2") == 0.0
    assert retrieval_zh("答案是段落2", "段落2") == 1.0
    assert retrieval_zh("段落12", "段落2") == 0.0
    assert count("There are 2 unique paragraphs, not 3", "2") == 0.5
    assert count("2", "2") == 1.0
    assert fuzz_ratio("abcd", "abce") == 75  # matching "abc": 2 * 3 / 8
    assert code_similarity("```python\n    return width * height\n```", "    return width * height") == 1.0
    assert code_similarity("\n# area\nabcd", "abce") == 0.75  # comment lines are skipped
    assert code_similarity("// only comments", "x = 1") == 0.0


def test_sample_score_is_first_line_for_few_shot_subsets_and_max_over_answers():
    answers = ["Mediterranean Sea", "the Mediterranean"]
    prediction = "\nthe Mediterranean\nQuestion: Which river is longest?"
    assert score_prediction("triviaqa", prediction, answers, None) == 1.0
    assert score_prediction("narrativeqa", prediction, answers, None) < 1.0  # whole text counts there
    assert score_prediction("trec", "City\nQuestion: x\nType: Country", ["City"], ["City", "Country"]) == 1.0
    assert score_prediction("lcc", "0", ["    return x"], None) == 0.0


@pytest.mark.slow
def test_bench_tasks_command_scores_every_subset():
    """`nsa-eval bench tasks` runs on the CPU and covers all 21 subsets (its timing is printed, never asserted)."""
    from click.testing import CliRunner

    from nsa_eval.bench.tasks import longbench_scoring
    from nsa_eval.cli import main

    count, _, per_subset = longbench_scoring(210)
    assert count >= 200 and len(per_subset) == 21
    result = CliRunner().invoke(main, ["bench", "tasks", "--predictions", "210", "--skip-humaneval"])
    assert result.exit_code == 0, result.output
    assert "LongBench: scored" in result.output
