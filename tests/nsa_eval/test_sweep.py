"""Budget sweeps (nsa_eval/sweep.py): `nsa-eval run --attention sparse --sparse-budget A,B` makes one normal run
folder per budget, resumes point by point (a finished point loads no model and is not touched; a partial one resumes),
and ends with the report's accuracy-by-budget table and curve; bad budget lists and folders are one line each."""

import json
from pathlib import Path

import pytest

from cli_checks import assert_one_line_error, invoke
from nsa_eval.report.build import build_report
from nsa_eval.run_config import RunConfig
from nsa_eval.store import RunStore
from nsa_eval.sweep import Sweep
from report_runs import niah, write_run
from test_report_tables import markdown_table

SPARSE = ["--attention", "sparse", "--sparse-leading", "16", "--sparse-local", "32", "--sparse-block", "16"]
SMALL = ["--model", "smollm2", "--tasks", "niah", "--niah-lengths", "512", "--niah-depths", "0,100",
         "--max-new-tokens", "8", "--quiet", *SPARSE]


@pytest.mark.slow
def test_a_sweep_of_two_budgets_makes_two_runs_resumes_point_by_point_and_reports(tmp_path, monkeypatch):
    """The sweep is interrupted (Ctrl-C) after the second point's first sample; the same command then finds the first
    point complete (no model loads for it, its files untouched) and resumes the second from 1 of its 2 samples."""
    out = tmp_path / "sweep"
    command = ["run", *SMALL, "--sparse-budget", "64,128", "--output", out]
    real_append = RunStore.append

    def append_then_interrupt(store, task, record):
        real_append(store, task, record)
        if store.root.name == "budget-128":
            raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "append", append_then_interrupt)
    first = invoke(*command)
    assert first.exit_code == 130, first.output
    assert "budget sweep of 2 points in" in first.output and "64 new, 128 new" in first.output
    assert "interrupted: 1/2 samples kept in" in first.output and "rerun the same command to resume" in first.output
    done = out / "budget-64"
    assert (done / "metrics.json").is_file() and not (out / "budget-128" / "metrics.json").exists()
    kept = {name: (done / name).read_bytes() for name in ("run.json", "metrics.json", "samples/niah.jsonl")}

    monkeypatch.setattr(RunStore, "append", real_append)
    again = invoke(*command)
    assert again.exit_code == 0, again.output
    assert "64 complete, 128 resuming 1/2" in again.output
    assert f"already complete: {done} holds all 2 samples" in again.output
    assert f"resuming 1/2 samples in {out / 'budget-128'}" in again.output
    assert again.output.count("loading smollm2") == 1  # only the partial point loads the model
    assert {name: (done / name).read_bytes() for name in kept} == kept  # the finished point was not redone

    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["budgets"] == [64, 128] and manifest["points"] == {"64": "budget-64", "128": "budget-128"}
    assert "--sparse-budget" not in manifest["settings"] and manifest["settings"]["--sparse-block"] == 16
    for budget in (64, 128):  # each point a normal run folder of its budget
        run = json.loads((out / f"budget-{budget}" / "run.json").read_text())
        assert run["sparse"] == {"budget": budget, "leading": 16, "local": 32, "block": 16}
        assert run["settings"]["--sparse-budget"] == budget and run["finished"]
        assert len((out / f"budget-{budget}" / "samples" / "niah.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "budget-128" / "run.json").read_text())["resumed"] == 1
    assert "niah accuracy by --sparse-budget: 64: " in again.output

    text = (out / "report" / "report.md").read_text()
    table = markdown_table(text, "SmolLM2-135M-Instruct: score by sparse budget (leading 16, local 32, block 16)")
    assert list(table.columns) == ["Task", "Samples", "64", "128"]
    assert list(table["Samples"]) == ["accuracy, all samples", "length 512"]
    for budget in (64, 128):
        metrics = json.loads((out / f"budget-{budget}" / "metrics.json").read_text())["tasks"]["niah"]
        assert table[str(budget)][0] == f"{metrics['metrics']['accuracy']['mean']:.3f} (n=2)"
    figure = out / "report" / "figures" / "budget-sweep-smollm2-135m-instruct-leading-16-local-32-block-16-niah"
    assert figure.with_suffix(".png").stat().st_size > 0 and figure.with_suffix(".svg").stat().st_size > 0
    # the sweep's folder is a report argument of its own
    assert invoke("report", out, "--out", tmp_path / "again", "--format", "md").exit_code == 0


@pytest.mark.parametrize("budgets, fragments", [
    ("256,abc", ["--sparse-budget '256,abc': 'abc' is not a whole number"]),
    ("0,256", ["--sparse-budget 0,256: 0 is not a budget"]),
    ("256,512,256", ["--sparse-budget 256,512,256 names 256 twice"]),
    (" , ", ["--sparse-budget is empty"]),
    ("32,256", ["--sparse-budget 32 tokens hold 2 blocks of 16 tokens, fewer than the 4 blocks (64 tokens)"]),
])
def test_a_bad_budget_list_is_one_line_before_anything_is_written(tmp_path, budgets, fragments):
    out = tmp_path / "sweep"
    result = invoke("run", *SMALL, "--sparse-budget", budgets, "--output", out)
    assert_one_line_error(result, *fragments, alone=True)
    assert not out.exists()


def test_a_sweep_needs_sparse_attention_and_a_folder_of_its_own(tmp_path):
    plain = [a for a in SMALL if a not in SPARSE]
    assert_one_line_error(invoke("run", *plain, "--sparse-budget", "64,128", "--output", tmp_path / "x"),
                          "--sparse-budget 64,128 (a budget sweep) applies only with --attention sparse", alone=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert_one_line_error(invoke("run", *SMALL, "--sparse-budget", "64,128", "--output", run),
                          f"--output {run} is a run folder; a budget sweep needs a folder of its own", alone=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("run", *SMALL, "--sparse-budget", "64,128", "--output", other),
                          "is not empty and holds no sweep.json", alone=True)


def point_configs(**given):
    """RunConfig.points_from_cli as `nsa-eval run *SMALL` calls it, with the flags in given changed."""
    flags = dict(model_spec="smollm2", attention="sparse", sparse_leading=16, sparse_local=32, sparse_block=16, sparse_selection=None,
                 task_list="niah", data_pairs=(), task_options=(), niah_lengths="512", niah_depths="0,100",
                 niah_samples=None, haystack=None, include_path=None, allow_code_execution=False, max_new_tokens=8,
                 quiet=True)
    return RunConfig.points_from_cli(**{**flags, **given})


def test_a_sweep_with_other_settings_is_refused_naming_them_and_more_budgets_grow_it(tmp_path):
    """sweep.json keeps the settings the points share; a rerun with others is one line before any model loads."""
    out = tmp_path / "sweep"
    sweep = Sweep.of(point_configs(sparse_budget="64,128", output=out, limit=1))
    sweep.check()
    sweep.write_manifest()
    result = invoke("run", *SMALL, "--sparse-budget", "64,128", "--output", out)
    assert_one_line_error(result, f"--output {out} holds a budget sweep with other settings (--limit: not given here, "
                          "1 in the sweep)", alone=True)
    more = Sweep.of(point_configs(sparse_budget="64,128,256", output=out, limit=1))
    assert [p.folder for p in more.points] == [out / f"budget-{b}" for b in (64, 128, 256)]
    assert [p.config.sparse.budget for p in more.points] == [64, 128, 256]
    more.check()  # more budgets with the same settings: the sweep grows
    more.write_manifest()
    assert json.loads((out / "sweep.json").read_text())["budgets"] == [64, 128, 256]
    single = point_configs(sparse_budget="96")  # one budget: a plain run
    assert len(single) == 1 and single[0].sparse.budget == 96 and single[0].output is None


def test_the_report_of_runs_that_differ_only_in_budget(tmp_path):
    """Sparse runs of one model and settings at several budgets (hand-made, run one by one or as a sweep) give the
    budget table, a column per budget and full attention's beside them, and the curve."""
    paths = []
    for budget, right in ((256, 0.2), (512, 0.6), (1024, 1.0)):
        path = write_run(tmp_path, f"budget-{budget}", f"M+sparse{budget}",
                         {"niah": niah(lambda length, depth, right=right: right if length > 1024 else 1.0)})
        info = json.loads((path / "run.json").read_text())
        info.update(attention="sparse", sparse={"budget": budget, "leading": 64, "local": 128, "block": 64})
        info["model"].update(spec="hf:/models/M", name=f"M+sparse{budget}")
        (path / "run.json").write_text(json.dumps(info))
        paths.append(path)
    full = write_run(tmp_path, "full", "M", {"niah": niah(lambda length, depth: 1.0)})
    info = json.loads((full / "run.json").read_text())
    info["model"]["spec"] = "hf:/models/M"
    (full / "run.json").write_text(json.dumps(info))
    (tmp_path / "sweep.json").write_text(json.dumps({"budgets": [256, 512, 1024], "points": {
        str(b): f"budget-{b}" for b in (256, 512, 1024)}}))
    build_report([tmp_path, full], tmp_path / "out", formats=("md",))  # the sweep folder stands for its runs
    text = (tmp_path / "out" / "report.md").read_text()
    table = markdown_table(text, "M: score by sparse budget (leading 64, local 128, block 64)")
    assert list(table.columns) == ["Task", "Samples", "256", "512", "1024", "full attention"]
    assert list(table["Samples"]) == ["accuracy, all samples", "length 1024", "length 2048", "length 4096"]
    for budget, path in zip((256, 512, 1024), paths):
        metrics = json.loads((path / "metrics.json").read_text())["tasks"]["niah"]
        assert table[str(budget)][0] == f"{metrics['metrics']['accuracy']['mean']:.3f} (n=60)"
        assert table[str(budget)][3] == f"{metrics['breakdowns']['length']['4096']['accuracy']['mean']:.3f} (n=20)"
    assert table["full attention"][0] == "1.000 (n=60)"
    assert Path(tmp_path / "out" / "figures" / "budget-sweep-m-leading-64-local-128-block-64-niah.svg").is_file()
