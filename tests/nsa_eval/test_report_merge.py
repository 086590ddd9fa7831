"""`nsa-eval report` over per-task runs of one model: the same columns whatever order the runs are given in, labels
short enough for a legend (the whole name in a note), and a baseline that names one existing column or is refused."""

import json

from cli_checks import assert_one_line_error, invoke
from report_runs import choice_task, niah, write_run
from test_report_tables import markdown_table, section

SMALL = dict(lengths=(1024,), depths=(0, 100), per_cell=2)


def per_task_runs(root, model="Llama-Full"):
    """Two NIAH runs and two MMLU runs of one model, made in the order a, b, c, d."""
    folders = [write_run(root, "a-niah", model, {"niah": niah(lambda n, d: 0.8, **SMALL)}),
               write_run(root, "b-mmlu", model, {"mmlu": choice_task(0.5, n=10, seed=1)}),
               write_run(root, "c-niah", model, {"niah": niah(lambda n, d: 0.6, seed=3, **SMALL)}),
               write_run(root, "d-mmlu", model, {"mmlu": choice_task(0.7, n=10, seed=2)})]
    for hour, folder in enumerate(folders):
        info = json.loads((folder / "run.json").read_text())
        info["created"] = f"2025-03-01T1{hour}:00:00+00:00"
        (folder / "run.json").write_text(json.dumps(info))
    return folders


def columns_of(out):
    runs = markdown_table((out / "report.md").read_text(), "Runs")
    return sorted({(column, tuple(sorted(runs[runs.Column == column]["Run id"]))) for column in runs.Column})


def test_merged_columns_do_not_depend_on_the_order_runs_are_given_in(tmp_path):
    a, b, c, d = per_task_runs(tmp_path / "runs")
    seen = []
    for order in ([a, b, c, d], [a, d, c, b], [d, c, b, a], [c, a, d, b]):
        out = tmp_path / f"out{len(seen)}"
        result = invoke("report", *order, "--format", "md", "--out", out)
        assert result.exit_code == 0, result.output
        seen.append({ids for _, ids in columns_of(out)})
    assert seen == [{("a-niah", "b-mmlu"), ("c-niah", "d-mmlu")}] * 4  # oldest first: a+b, then c+d


def test_long_labels_are_cut_with_the_whole_name_in_a_note(tmp_path):
    long_name = "Llama-3.2-1B-Instruct-NSA-retrofit-" + "x" * 60
    folders = [write_run(tmp_path / "one", "r", long_name, {"niah": niah(lambda n, d: 0.8, **SMALL)}),
               write_run(tmp_path / "two", "r", long_name, {"niah": niah(lambda n, d: 0.6, seed=2, **SMALL)})]
    out = tmp_path / "out"
    result = invoke("report", *folders, "--format", "md", "--out", out)
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    labels = list(markdown_table(text, "Scores by model (headline metric of each task)").Model)
    assert len(labels) == 2 and len(set(labels)) == 2 and all(len(label) <= 40 for label in labels), labels
    notes = section(text, "Runs")
    for label in labels:
        assert f"{label}: {long_name} (" in notes
    assert invoke("report", *folders, "--baseline", labels[1], "--format", "md", "--out", tmp_path / "by-label").exit_code == 0


def test_a_baseline_that_names_no_run_or_two_columns_is_one_line_and_writes_nothing(tmp_path):
    a, b, c, d = per_task_runs(tmp_path / "runs")
    out = tmp_path / "out"
    assert_one_line_error(invoke("report", a, b, c, d, "--baseline", "nu-int", "--out", out),
                          "baseline 'nu-int' is not among the runs", alone=True)
    other = write_run(tmp_path / "other", "a-niah", "Llama-NSA", {"niah": niah(lambda n, d: 0.7, seed=5, **SMALL)})
    assert_one_line_error(invoke("report", a, other, "--baseline", "a-niah", "--out", out),
                          "baseline 'a-niah' names runs in 2 columns", "give its folder", alone=True)
    assert not out.exists()
    result = invoke("report", a, other, "--baseline", other, "--format", "md", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Llama-NSA (baseline)" in (out / "report.md").read_text()
