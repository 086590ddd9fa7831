"""run.json records the budgets and shot counts a run used (after --max-new-tokens, after the chat template's
defaults), and the report heads, splits and compares with the paper by those recorded values: a capped AIME run is
not beside the paper's 8k rows, a 0-shot GSM8K not beside the paper's 8-shot number nor in one column with a 5-shot
run."""

import json

import pytest

from cli_checks import invoke
from test_report_tables import markdown_table, section

pytestmark = pytest.mark.slow  # real runs of the real model

BY_MODEL = "Scores by model (headline metric of each task)"


def test_capped_aime_and_0_shot_gsm8k_are_reported_as_run(shared_data, tmp_path):
    gsm8k_rows = tmp_path / "gsm8k.jsonl"
    gsm8k_rows.write_text("".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines(True)[:8]))
    common = ["--model", "smollm2", "--limit", "1", "--quiet"]
    capped = invoke("run", *common, "--tasks", "aime,gsm8k", "--data", f"aime={shared_data / 'aime24' / 'test.jsonl'}",
                    "--data", f"gsm8k={gsm8k_rows}", "--task-option", "aime.n_samples=2", "--max-new-tokens", "48",
                    "--output", tmp_path / "cot")
    assert capped.exit_code == 0, capped.output
    standard = invoke("run", *common, "--tasks", "gsm8k", "--data", f"gsm8k={gsm8k_rows}", "--task-option",
                      "gsm8k.variant=standard", "--max-new-tokens", "8", "--output", tmp_path / "standard")
    assert standard.exit_code == 0, standard.output

    run_info = json.loads((tmp_path / "cot" / "run.json").read_text())
    assert run_info["budgets_used"] == {"aime": 48, "gsm8k": 48}  # after the cap (AIME asks 8192, GSM8K cot 512)
    tasks = run_info["tasks"]
    assert tasks["aime"]["config"]["generation_budget"] == 48  # used, not the 8192 asked for
    assert json.loads((tmp_path / "cot" / "metrics.json").read_text())["tasks"]["aime"]["generation_budget"] == 48
    assert tasks["gsm8k"]["config"]["num_fewshot"] == 0 and tasks["gsm8k"]["config"]["chat"] is True
    config = json.loads((tmp_path / "standard" / "run.json").read_text())["tasks"]["gsm8k"]["config"]
    assert config["num_fewshot"] == 5 and config["variant"] == "standard"

    result = invoke("report", tmp_path / "cot", tmp_path / "standard", "--reference", "nsa-paper", "--format", "md",
                    "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    table = markdown_table(text, BY_MODEL)
    cot, five = "gsm8k (cot, 0-shot flexible_extract)", "gsm8k (standard, 5-shot flexible_extract)"
    assert list(table.columns) == ["Model", "aime (accuracy, 2 samples, 48 budget)", cot, five, "Avg"]
    rows = {r[0].split("[")[0].split(" (")[0]: r for r in table.itertuples(index=False)}
    for paper_row in ("Full Attn", "NSA"):  # the paper's GSM8K is 8-shot: beside neither run
        cells = rows[paper_row]
        assert cells[2].startswith("\u2014[") and cells[3].startswith("\u2014["), cells
    notes = section(text, BY_MODEL)
    assert "gsm8k (cot, 0-shot flexible_extract): the paper's gsm8k is acc 8-shot; not shown beside" in notes
    budget_table = markdown_table(text, "aime by generation budget (the paper's Table 3 form)")
    assert list(budget_table.columns) == ["Model", "48 budget"]  # no 8k column, no paper row beside it
    assert not any("(paper)" in row[0] for row in budget_table.itertuples(index=False))


def test_ruler_without_qa_data_says_so_at_start_and_its_table_marks_the_partial_set(tmp_path):
    out = tmp_path / "ruler"
    result = invoke("run", "--model", "smollm2", "--tasks", "ruler", "--task-option", "ruler.lengths=1k", "--limit", "1",
                    "--max-new-tokens", "4", "--quiet", "--output", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    notice = ("ruler: qa_1/qa_2 need --data ruler=DIR (RULER's squad.json, hotpotqa.json); running 11 of 13 tasks")
    assert lines.count(notice) == 1 and lines.index(notice) < lines.index("loading smollm2 ...")
    report = invoke("report", out, "--format", "md", "--out", tmp_path / "report")
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    title = "ruler: RULER's table (score in percent, mean over tasks per length)"
    row = markdown_table(text, title).iloc[0]
    assert row.iloc[0].startswith("SmolLM2-135M-Instruct[") and row.iloc[2].startswith("\u2014[")
    assert "11 of RULER's 13 tasks (cwe, fwe, niah_multikey_1" in section(text, title)
