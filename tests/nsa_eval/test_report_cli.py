"""`nsa-eval report` and `nsa-eval publish` through the real CLI group: output paths, and one clear line with
a non-zero exit for bad input."""

import functools
import shutil
import subprocess

import pytest

from cli_checks import assert_one_line_error as error_line
from cli_checks import invoke
from report_runs import choice_task, niah, write_run

assert_one_line_error = functools.partial(error_line, alone=True)  # the report commands print only the error line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    small_niah = dict(lengths=(1024, 2048), depths=(0, 50, 100), per_cell=2)
    return (write_run(root, "full-1", "Full", {"niah": niah(lambda length, depth: 0.9, **small_niah)}),
            write_run(root, "nsa-1", "NSA", {"niah": niah(lambda length, depth: 1.0, seed=1, **small_niah),
                                             "mmlu": choice_task(0.5, n=10)}))


@pytest.mark.slow
def test_report_and_publish(runs, tmp_path):
    out = tmp_path / "report"
    result = invoke("report", *runs, "--baseline", "full-1", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'report.md'}" in result.output
    assert f"wrote {out / 'figures' / 'niah-length-x-depth-full-1.png'}" in result.output
    assert (out / "report.html").is_file() and (out / "tables.tex").is_file() and (out / "results.csv").is_file()
    result = invoke("publish", out, "--name", "first-set", "--results-dir", tmp_path / "results")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "first-set" / "README.md").is_file()
    assert result.output.strip() == f"published {tmp_path / 'results' / 'first-set'}"  # no `git add` outside a repo
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    in_repo = invoke("publish", out, "--name", "first-set", "--results-dir", tmp_path / "repo" / "results")
    assert in_repo.exit_code == 0 and "commit it with `git add" in in_repo.output
    assert_one_line_error(invoke("publish", out, "--name", "first-set", "--results-dir", tmp_path / "results"),
                          "already exists", "--force")
    assert invoke("publish", out, "--name", "first-set", "--results-dir", tmp_path / "results", "--force").exit_code == 0


def test_report_formats_and_default_folder(runs, tmp_path):
    run = shutil.copytree(runs[0], tmp_path / "full-1")
    result = invoke("report", run, "--format", "md,csv")
    assert result.exit_code == 0, result.output
    assert (run / "report" / "report.md").is_file() and (run / "report" / "results.csv").is_file()
    assert not (run / "report" / "report.html").exists()
    assert_one_line_error(invoke("report", run, "--format", "md,pdf"), "unknown report format 'pdf'", "md,html,latex,csv")
    assert_one_line_error(invoke("report", run, "--out", tmp_path / "r", "--bench-dir", tmp_path / "none"),
                          "--bench-dir", "holds no kernels-<card>.json", "leave --bench-dir out")


def test_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("report", tmp_path / "empty", "--out", tmp_path / "r"), "is not a run directory",
                          "no run.json")
    assert_one_line_error(invoke("report", tmp_path / "nowhere", "--out", tmp_path / "r"), "run '", "not found")


def test_corrupt_metrics_json(runs, tmp_path):
    run = shutil.copytree(runs[0], tmp_path / "broken")
    (run / "metrics.json").write_text('{"model": "Full", "tasks": {"niah": ')
    assert_one_line_error(invoke("report", run, "--out", tmp_path / "r"), "metrics.json is corrupt", "invalid JSON")
    (run / "metrics.json").write_text('{"model": "Full", "tasks": {"niah": {"headline": "accuracy"}}}')
    assert_one_line_error(invoke("report", run, "--out", tmp_path / "r"), "task 'niah' is corrupt")
    (run / "metrics.json").unlink()
    assert_one_line_error(invoke("report", run, "--out", tmp_path / "r"), "has no metrics.json", "resume")


@pytest.mark.slow
def test_corrupt_samples_file(runs, tmp_path):
    run = shutil.copytree(runs[0], tmp_path / "torn")
    with (run / "samples" / "niah.jsonl").open("a") as handle:
        handle.write('{"id": "niah-x", "scores": {"accur')
    assert_one_line_error(invoke("report", run, "--out", tmp_path / "r"), "niah.jsonl line 13 is corrupt")


def test_baseline_not_among_the_runs(runs, tmp_path):
    assert_one_line_error(invoke("report", *runs, "--baseline", "other-run", "--out", tmp_path / "r"),
                          "baseline 'other-run' is not among the runs (full-1, nsa-1)")


def test_publish_of_a_folder_that_is_not_a_report(tmp_path):
    assert_one_line_error(invoke("publish", tmp_path, "--name", "x", "--results-dir", tmp_path / "results"),
                          "is not a report folder")
