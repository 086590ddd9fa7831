"""The perplexity task through `nsa-eval run` on the embedded SmolLM2 (CPU): per-bin metrics, what run.json records,
the report's table (a row per model, a column per position bin), and bad data paths as one line."""

import json
import math
import shutil

import pytest

from cli_checks import assert_one_line_error, invoke
from test_report_tables import markdown_table

from nsa_eval.report.build import build_report

DOCS = {
    "fox.txt": "The quick brown fox jumps over the lazy dog. " * 5,
    "hitchhiker.txt": "In the beginning the universe was created. This has made a lot of people very angry and been "
                      "widely regarded as a bad move.",
}
RUN = ["--model", "smollm2", "--tasks", "perplexity", "--max-length", "32", "--task-option",
       "perplexity.bin_width=16", "--device", "cpu", "--quiet"]


@pytest.fixture
def documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def test_perplexity_by_position_end_to_end(documents, tmp_path):
    full, sparse = tmp_path / "full", tmp_path / "sparse"
    result = invoke("run", *RUN, "--data", f"perplexity={documents}", "--output", full)
    assert result.exit_code == 0, result.output
    metrics = json.loads((full / "metrics.json").read_text())["tasks"]["perplexity"]
    records = [json.loads(line) for line in (full / "samples" / "perplexity.jsonl").read_text().splitlines()]
    assert metrics["n"] == 2 and metrics["headline"] == "perplexity" and sorted(r["id"] for r in records) == sorted(DOCS)
    assert set(metrics["breakdowns"]["position"]) == {"0", "16"}  # positions 0-31 of windows of 32 tokens
    tokens = sum(r["tokens"] for r in records)
    assert tokens > 32 and sum(r["details"]["tokens"] for r in records) == tokens  # the fox takes two windows
    assert sum(cell["perplexity"]["tokens"] for cell in metrics["breakdowns"]["position"].values()) == tokens
    nll = -sum(r["loglikelihood"] for r in records)
    assert metrics["metrics"]["perplexity"]["mean"] == pytest.approx(math.exp(nll / tokens))
    first = metrics["breakdowns"]["position"]["0"]["perplexity"]
    assert first["n"] == 2 and first["mean"] > metrics["breakdowns"]["position"]["16"]["perplexity"]["mean"]
    info = json.loads((full / "run.json").read_text())["tasks"]["perplexity"]
    assert info["config"]["documents"] == 2 and len(info["config"]["documents_sha256"]) == 64
    assert info["config"]["bin_width"] == 16 and info["config"]["window"] == "disjoint" and len(info["prompts_digest"]) == 16

    # sparse attention whose budget covers the 32-token window, beside full attention in the report
    result = invoke("run", *RUN, "--data", f"perplexity={documents}", "--output", sparse, "--attention", "sparse",
                    "--sparse-budget", "64", "--sparse-leading", "8", "--sparse-local", "24", "--sparse-block", "8")
    assert result.exit_code == 0, result.output
    theirs = json.loads((sparse / "metrics.json").read_text())["tasks"]["perplexity"]
    assert theirs["metrics"]["perplexity"]["mean"] == pytest.approx(metrics["metrics"]["perplexity"]["mean"], rel=1e-4)
    report = tmp_path / "report"
    build_report([full, sparse], report, formats=("md",))
    text = (report / "report.md").read_text()
    table = markdown_table(text, "perplexity: perplexity by position in the window (a row per model)")
    assert list(table.columns) == ["Model", "0-16", "16-32", "all"] and len(table) == 2
    assert table["0-16"][0].startswith(f"{first['mean']:.2f} (n=2)")

    # beside scored tasks, a perplexity stays out of the model table's average (lower is better there)
    mixed = tmp_path / "mixed"
    shutil.copytree(full, mixed)
    run_info, written = json.loads((mixed / "run.json").read_text()), json.loads((mixed / "metrics.json").read_text())
    for name, score in (("mmlu", 0.5), ("gsm8k", 0.3)):
        run_info["tasks"][name] = {"version": "1", "config": {}, "prompts_digest": name, "n": 2}
        written["tasks"][name] = {"version": "1", "headline": "acc", "n": 2, "breakdowns": {},
                                  "metrics": {"acc": {"mean": score, "stderr": 0.1}}}
    (mixed / "run.json").write_text(json.dumps(run_info))
    (mixed / "metrics.json").write_text(json.dumps(written))
    build_report([mixed], tmp_path / "mixed-report", formats=("md",))
    text = (tmp_path / "mixed-report" / "report.md").read_text()
    by_model = markdown_table(text, "Scores by model (headline metric of each task)")
    assert by_model["Avg"][0].startswith("0.400") and "Avg leaves out perplexity" in text


@pytest.mark.parametrize("data, message", [
    ("perplexity=MISSING", "does not exist; give a .txt file, a folder of .txt files, or a .jsonl file"),
    ("perplexity=EMPTY", "holds no .txt files"),
    (None, "give them with --data perplexity=PATH"),
])
def test_bad_documents_are_one_line_before_the_model_loads(tmp_path, data, message):
    (tmp_path / "empty").mkdir()
    given = [] if data is None else ["--data", data.replace("MISSING", str(tmp_path / "missing"))
                                     .replace("EMPTY", str(tmp_path / "empty"))]
    result = invoke("run", *RUN, *given, "--output", tmp_path / "run")
    assert_one_line_error(result, message, alone=True)
    assert not (tmp_path / "run").exists()
