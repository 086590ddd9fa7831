"""The report's RULER table (RULER's README form: models x lengths, averages) and AIME by generation budget beside
the paper's Table 3 rows of the same budget; MMLU's category groups as a breakdown table."""

import json
import random

import pytest

from nsa_eval.report.build import build_report
from nsa_eval.report.table import DASH
from nsa_eval.tasks.ruler_data import SUBTASKS
from report_runs import TaskData, record, write_run
from test_report_tables import markdown_table, section

RULER_TASKS = tuple(SUBTASKS)  # all 13: RULER's averages and threshold hold for the whole set
LENGTHS = (4096, 8192, 16384, 32768)


def ruler_run(quality, *, per_cell=4, seed=0, lengths=LENGTHS, tasks=RULER_TASKS):
    """RULER records: a 0..1 score per sample (string_match_all shares), broken down by task and length."""
    rng = random.Random(seed)
    records = []
    for task in tasks:
        for length in lengths:
            for k in range(per_cell):
                score = rng.choice([0.0, 0.5, 1.0]) if rng.random() > quality(task, length) else 1.0
                records.append(record(f"{task}/{length}/{k}", f"{task} {length} {k}", ["a"], "a",
                                      {"score": score}, {"task": task, "length": length}, rng))
    return TaskData(records, "score", ("task", "length"), config={"lengths": list(lengths)})


@pytest.mark.slow
def test_ruler_table_in_rulers_readme_form(tmp_path):
    strong = ruler_run(lambda task, length: 0.99 if length <= 8192 else 0.9, seed=1)
    weak = ruler_run(lambda task, length: 0.8 if length == 4096 else 0.3, seed=2)
    runs = [write_run(tmp_path, "full", "Full", {"ruler": strong}), write_run(tmp_path, "nsa", "NSA", {"ruler": weak})]
    build_report(runs, tmp_path / "out", baseline="full", formats=("md", "csv"))
    text = (tmp_path / "out" / "report.md").read_text()
    title = "ruler: RULER's table (score in percent, mean over tasks per length)"
    table = markdown_table(text, title)
    assert list(table.columns) == ["Models", "Claimed Length", "Effective Length", "4K", "8K", "16K", "32K", "Avg.",
                                   "wAvg. (inc)", "wAvg. (dec)"]
    for row, data in zip(table.itertuples(index=False), (strong, weak)):
        per_length = []
        for length in LENGTHS:
            task_means = []
            for task in RULER_TASKS:
                scores = [r["scores"]["score"] for r in data.records if r["breakdown"] == {"task": task, "length": length}]
                task_means.append(100 * sum(scores) / len(scores))
            per_length.append(sum(task_means) / len(task_means))
        assert list(row[3:7]) == [f"{v:.1f}" for v in per_length]
        assert row[7] == f"{sum(per_length) / 4:.1f}"
        assert row[8] == f"{sum(w * v for w, v in zip((1, 2, 3, 4), per_length)) / 10:.1f}"
        assert row[9] == f"{sum(w * v for w, v in zip((4, 3, 2, 1), per_length)) / 10:.1f}"
        assert row[1] == "8K"  # the run's max length
        passing = [length for length, v in zip(LENGTHS, per_length) if v > 85.6]
        expected = "<4K"
        for length, v in zip(LENGTHS, per_length):
            if v <= 85.6:
                break
            expected = f"{length // 1024}K"
        if expected == "32K":
            expected = "\u226532K"
        # the effective length is decided by the bootstrap interval (report/effective.py; the borderline cases are in
        # test_report_effective_length.py): the strong row's scores are far above 85.6, so the point estimates agree;
        # the weak row's 4K scores 92.3 over 4 samples per task, an interval reaching below 85.6, and a note gives the
        # point estimates' answer
        if row[0].startswith("Full"):
            assert row[2].split("[")[0] == expected, (per_length, passing)
        else:
            assert expected == "4K" and row[2].split("[")[0] == "<4K"
            assert ("the effective length would be 4K; the interval does not support it"
                    in section(text, title)), section(text, title)
    assert table.iloc[0, 0].startswith("Full (baseline)")
    assert "85.6" in section(text, title)
    # the generic views are there too: by task, by length, the task x length heatmap
    assert "### ruler by task" in text and "### ruler by length" in text
    assert (tmp_path / "out" / "tables" / "ruler-ruler.csv").is_file()


@pytest.mark.slow
def test_ruler_table_marks_missing_lengths(tmp_path):
    short = ruler_run(lambda task, length: 1.0, lengths=(4096,))
    runs = [write_run(tmp_path, "a", "A", {"ruler": ruler_run(lambda t, n: 1.0)}), write_run(tmp_path, "b", "B", {"ruler": short})]
    build_report(runs, tmp_path / "out", formats=("md",))
    table = markdown_table((tmp_path / "out" / "report.md").read_text(),
                           "ruler: RULER's table (score in percent, mean over tasks per length)")
    assert table.iloc[0, 2].split("[")[0] == "\u226532K" and table.iloc[0, 7] == "100.0"
    assert table.iloc[1, 3] == "100.0" and table.iloc[1, 4].startswith(DASH) and table.iloc[1, 7].startswith(DASH)


def test_a_partial_ruler_set_is_marked_and_has_no_effective_length(tmp_path):
    """`ruler.tasks=niah_single_1,vt`, or RULER without its QA data: the row names the tasks its averages cover, and
    RULER's 85.6 threshold (a 13-task average) gives it no effective length."""
    two = ruler_run(lambda task, length: 1.0, lengths=(4096,), tasks=("niah_single_1", "vt"))
    whole = ruler_run(lambda task, length: 1.0, lengths=(4096,))
    runs = [write_run(tmp_path, "two", "Two", {"ruler": two}), write_run(tmp_path, "whole", "Whole", {"ruler": whole})]
    build_report(runs, tmp_path / "out", formats=("md",))
    text = (tmp_path / "out" / "report.md").read_text()
    title = "ruler: RULER's table (score in percent, mean over tasks per length)"
    table = markdown_table(text, title)
    rows = {r[0].split("[")[0]: r for r in table.itertuples(index=False)}
    assert rows["Two"][0] != "Two" and rows["Two"][2].startswith(DASH + "[") and rows["Two"][3] == "100.0"
    assert rows["Whole"][2].split("[")[0] == "\u22654K" and section(text, title).count("of RULER's 13 tasks") == 1
    notes = section(text, title)
    assert "Two: 2 of RULER's 13 tasks (niah_single_1, vt); its averages are over these tasks only" in notes
    assert "RULER's threshold (85.6) is a 13-task average; none for a partial set" in notes


def aime_run(accuracy, budget, *, key="generation_budget", n=30, seed=0):
    rng = random.Random(seed)
    records = [record(f"2024-{i}", f"problem {i}", "42", "\\boxed{42}", {"accuracy": float(rng.random() < accuracy)},
                      rng=rng) for i in range(n)]
    config = {"n_samples": 16, "max_new_tokens": budget, key: budget}
    return TaskData(records, "accuracy", (), config=config)


def test_aime_beside_the_papers_table3_rows_of_its_budget(tmp_path):
    runs = [write_run(tmp_path, "r8", "NSA-8k", {"aime": aime_run(0.2, 8192, seed=1)}),
            write_run(tmp_path, "r16", "NSA-16k", {"aime": aime_run(0.3, 16384, seed=2)}),
            write_run(tmp_path, "old", "Old-run", {"aime": aime_run(0.1, 8192, key="max_new_tokens", seed=3)})]
    build_report(runs, tmp_path / "out", reference="nsa-paper", formats=("md",))
    text = (tmp_path / "out" / "report.md").read_text()
    title = "aime by generation budget (the paper's Table 3 form)"
    table = markdown_table(text, title)
    assert list(table.columns) == ["Model", "8k budget", "16k budget"]
    rows = {r[0].split("[")[0]: r[1:] for r in table.itertuples(index=False)}
    assert rows["NSA-8k"][0].startswith("0.") and rows["NSA-8k"][1] == DASH
    assert rows["NSA-16k"][0] == DASH and rows["NSA-16k"][1].startswith("0.")
    assert rows["Old-run"][0].startswith("0.")  # an older run's max_new_tokens is its budget
    assert rows["Full Attention-R (paper)"] == ("0.046", "0.092") and rows["NSA-R (paper)"] == ("0.121", "0.146")
    assert "Table 3" in section(text, title)
    by_model = markdown_table(text, "Scores by model (headline metric of each task)")
    assert by_model.columns[1] == "aime (accuracy, 16 samples, 8k budget)"

    capped = write_run(tmp_path / "c", "c48", "NSA-capped", {"aime": aime_run(0.2, 8192, seed=4)})
    info = json.loads((capped / "run.json").read_text())  # an older capped run: its config says 8192
    (capped / "run.json").write_text(json.dumps({**info, "max_new_tokens": 48}))
    build_report([capped], tmp_path / "out48", reference="nsa-paper", formats=("md",))
    table48 = markdown_table((tmp_path / "out48" / "report.md").read_text(), title)
    assert list(table48.columns) == ["Model", "48 budget"] and len(table48) == 1  # not beside the paper's 8k rows

    other = [write_run(tmp_path / "x", "r4", "NSA-4k", {"aime": aime_run(0.2, 4096)})]
    build_report(other, tmp_path / "out4", reference="nsa-paper", formats=("md",))
    text = (tmp_path / "out4" / "report.md").read_text()
    assert list(markdown_table(text, title).columns) == ["Model", "4k budget"]
    assert "reports generation budgets 8k, 16k only" in section(text, title)
    build_report(runs, tmp_path / "plain", formats=("md",))
    assert "(paper)" not in section((tmp_path / "plain" / "report.md").read_text(), title)


def test_mmlu_categories_in_the_report(tmp_path):
    from nsa_eval.tasks.mmlu import MMLU

    rng = random.Random(0)
    subjects = ("college_physics", "philosophy", "sociology", "virology", "astronomy")
    records = [record(f"{s}/{i}", f"q {s} {i}", "A", "A", {"accuracy": float(rng.random() < 0.6)}, {"subject": s}, rng)
               for s in subjects for i in range(10 + 5 * subjects.index(s))]
    data = TaskData(records, "accuracy", ("subject",), config={"num_fewshot": 5})
    run = write_run(tmp_path, "m", "Model", {"mmlu": data})
    # write_run aggregates with the generic function; give metrics.json what the MMLU task writes
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    metrics["tasks"]["mmlu"].update({k: v for k, v in MMLU().aggregate(records).items() if k != "n"})
    (run / "metrics.json").write_text(json.dumps(metrics))
    build_report([run], tmp_path / "out", formats=("md",))
    text = (tmp_path / "out" / "report.md").read_text()
    table = markdown_table(text, "mmlu by category")
    assert sorted(table["category"]) == ["humanities", "other", "social_sciences", "stem"]
    stem = [r["scores"]["accuracy"] for r in records if r["breakdown"]["subject"] in ("college_physics", "astronomy")]
    assert table[table["category"] == "stem"].iloc[0, 1] == f"{sum(stem) / len(stem):.3f} (n={len(stem)})"
    assert "accuracy_humanities" in markdown_table(text, "Scores by task and metric (mean \u00b1 standard error)")["Metric"].tolist()
