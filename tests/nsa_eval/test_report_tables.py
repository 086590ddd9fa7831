"""Report tables: values equal the runs' metrics.json, partial and mismatched runs are marked, deltas are
paired, the paper's numbers appear when asked, and LaTeX and CSV read back through pandas."""

import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from nsa_eval.report.build import build_report, publish
from nsa_eval.report.table import DASH
from nsa_eval.stats import paired_bootstrap
from report_runs import choice_task, longbench, niah, write_bench, write_run

# every test here is slow (the shared report with figures in every format takes seconds to build); the quick
# subset keeps report building through test_report_cli.py and test_report_ruler_aime.py
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "full": write_run(root, "full-1", "Llama-Full", {
            "niah": niah(lambda length, depth: 0.95 if length <= 2048 else 0.6),
            "mmlu": choice_task(0.5, n=200, seed=1), "gsm8k": choice_task(0.4, seed=2, shots=8)}),
        # same needles and questions; better on mmlu (0.5 -> 0.7 on the same draws), no gsm8k results
        "nsa": write_run(root, "nsa-1", "Llama-NSA", {
            "niah": niah(lambda length, depth: 0.95 if length <= 2048 else 0.6, seed=3),
            "mmlu": choice_task(0.7, n=200, seed=1)}, planned_only=("gsm8k",)),
        # a different NIAH version: must be flagged, never compared
        "other": write_run(root, "nsa-v2", "Llama-NSA-v2", {
            "niah": replace(niah(lambda length, depth: 0.9, seed=4), version="2")}),
    }


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report([runs["full"], runs["nsa"], runs["other"]], out, baseline="full-1", reference="nsa-paper")
    return out


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["tasks"]


def section(text: str, title: str) -> str:
    """The Markdown under '### title': the table and its notes."""
    return re.split(r"\n#", text.split(f"### {title}\n\n", 1)[1], maxsplit=1)[0]


def markdown_table(text: str, title: str) -> pd.DataFrame:
    """The Markdown table under '### title' as strings."""
    block = section(text, title).split("\n\n", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def test_table_values_equal_metrics_json(runs, report):
    long = pd.read_csv(report / "results.csv", keep_default_na=False)
    checked = 0
    for run in runs.values():
        for task, entry in metrics(run).items():
            for metric, value in entry["metrics"].items():
                row = long[(long.run_id == run.name) & (long.task == task) & (long.metric == metric) & (long.breakdown == "")]
                assert len(row) == 1
                assert row["mean"].item() == pytest.approx(value["mean"], abs=1e-12)
                assert row["stderr"].item() == pytest.approx(value["stderr"], abs=1e-12)
                assert row["n"].item() == entry["n"]
                checked += 1
            for key, cells in entry["breakdowns"].items():
                for value, by_metric in cells.items():
                    row = long[(long.run_id == run.name) & (long.task == task) & (long.breakdown == key)
                               & (long.value.astype(str) == value) & (long.metric == entry["headline"])]
                    assert row["mean"].item() == pytest.approx(by_metric[entry["headline"]]["mean"], abs=1e-12)
                    assert row["n"].item() == by_metric[entry["headline"]]["n"]
    assert checked == 6

    md = (report / "report.md").read_text()
    by_model = markdown_table(md, "Scores by model (headline metric of each task)")
    full = by_model[by_model.Model == "Llama-Full (baseline)"].iloc[0]
    for task, entry in metrics(runs["full"]).items():
        column = next(c for c in by_model.columns if c.startswith(f"{task} ("))
        assert full[column] == f"{entry['metrics'][entry['headline']]['mean']:.3f} (n={entry['n']})"
    by_task = markdown_table(md, "Scores by task and metric (mean \u00b1 standard error)")
    mmlu = metrics(runs["nsa"])["mmlu"]["metrics"]["acc"]
    row = by_task[(by_task.Task == "mmlu") & (by_task.Metric == "acc")].iloc[0]
    assert row["Llama-NSA"] == f"{mmlu['mean']:.3f} \u00b1 {mmlu['stderr']:.3f} (n=200)"
    assert by_model.columns[-1] == "Avg"
    expected_avg = sum(e["metrics"][e["headline"]]["mean"] for e in metrics(runs["full"]).values()) / 3
    assert full["Avg"] == f"{expected_avg:.3f}"


def test_partial_runs_show_a_dash_with_a_footnote(report):
    md = (report / "report.md").read_text()
    by_model = markdown_table(md, "Scores by model (headline metric of each task)")
    nsa = by_model[by_model.Model == "Llama-NSA"].iloc[0]
    notes = section(md, "Scores by model (headline metric of each task)")
    mark = re.fullmatch(f"{DASH}\\[(\\d+)\\]", nsa["gsm8k (8-shot acc)"])
    assert mark, nsa["gsm8k (8-shot acc)"]
    assert f"[{mark.group(1)}] Llama-NSA: gsm8k is listed in run.json but has no results in metrics.json (partial run)" in notes
    v2 = by_model[by_model.Model == "Llama-NSA-v2"].iloc[0]
    mark = re.fullmatch(f"{DASH}\\[(\\d+)\\]", v2["mmlu (5-shot acc)"])
    assert f"[{mark.group(1)}] Llama-NSA-v2: mmlu was not run" in notes
    assert nsa["Avg"].startswith(DASH)  # no average over a partial row


def test_different_task_versions_are_flagged_and_not_compared(report):
    md = (report / "report.md").read_text()
    by_task = markdown_table(md, "Scores by task and metric (mean \u00b1 standard error)")
    niah_row = by_task[by_task.Task == "niah"].iloc[0]
    notes = section(md, "Scores by task and metric (mean \u00b1 standard error)")
    note = re.search(r"\[(\d+)\] Llama-NSA-v2: niah is not comparable with Llama-Full \(task version 2 vs 1\)", notes)
    assert note
    assert niah_row["Llama-NSA-v2"].endswith(f"[{note.group(1)}]")
    assert niah_row["\u0394 Llama-NSA-v2 vs Llama-Full"].startswith("n/a[")
    figures = {p.name for p in (report / "figures").iterdir()}
    assert "niah-length-x-depth-nsa-1-minus-full-1.png" in figures
    assert not any("nsa-v2-minus" in name for name in figures)  # no difference map across versions
    long = pd.read_csv(report / "results.csv", keep_default_na=False)
    row = long[(long.run_id == "nsa-v2") & (long.task == "niah") & (long.breakdown == "")]
    assert row["delta"].item() == "" and "task version 2 vs 1" in row["delta_note"].item()


def test_deltas_are_paired_bootstrap_intervals(runs, report):
    def scores(run, task, metric):
        lines = (run / "samples" / f"{task}.jsonl").read_text().splitlines()
        return {r["id"]: r["scores"][metric] for r in map(json.loads, lines)}

    md = (report / "report.md").read_text()
    by_task = markdown_table(md, "Scores by task and metric (mean \u00b1 standard error)")
    seen = set()
    for task, metric in (("mmlu", "acc"), ("niah", "accuracy")):
        expected = paired_bootstrap(scores(runs["nsa"], task, metric), scores(runs["full"], task, metric), seed=0)
        mark = "*" if expected.excludes_zero else ""
        cell = by_task[by_task.Task == task].iloc[0]["\u0394 Llama-NSA vs Llama-Full"]
        assert cell == f"{expected.delta:+.3f} [{expected.low:+.3f}, {expected.high:+.3f}]{mark} (n={expected.n})"
        seen.add(expected.excludes_zero)
    assert seen == {True, False}  # one significant difference (mmlu +0.2), one not (niah)


def test_paper_reference_rows_only_when_asked(runs, report, tmp_path):
    md = (report / "report.md").read_text()
    by_model = markdown_table(md, "Scores by model (headline metric of each task)")
    paper = by_model[by_model.Model.str.startswith("NSA (paper)")].iloc[0]
    assert paper["mmlu (5-shot acc)"] == "0.565" and paper["gsm8k (8-shot acc)"] == "0.520"
    assert paper["niah (accuracy)"].startswith(DASH)
    plain = tmp_path / "plain"
    build_report([runs["full"]], plain, formats=("md",))
    assert "(paper)" not in (plain / "report.md").read_text()


def parse_latex_tabular(tex: str, label: str) -> pd.DataFrame:
    """The tabular of the table labelled tab:<label>, read back through pandas (cells separated by &)."""
    block = tex.split(f"\\label{{tab:{label}}}", 1)[1].split("\\end{tabular}", 1)[0]
    head = block.split("\\toprule\n", 1)[1].split("\\midrule\n", 1)
    body = head[1].split("\\bottomrule", 1)[0]
    text = "\n".join(line.removesuffix(" \\\\") for line in [head[0].strip(), *body.strip().splitlines()])
    frame = pd.read_csv(io.StringIO(text), sep=" & ", engine="python", dtype=str, keep_default_na=False)
    unescape = [("$\\pm$", "\u00b1"), ("$\\Delta$", "\u0394"), ("---", DASH), ("\\_", "_"), ("\\%", "%"),
                ("\\&", "&"), ("\\#", "#")]
    def plain(value: str) -> str:
        value = re.sub(r"\\textsuperscript\{(\[\d+\])\}", r"\1", value)
        for escaped, char in unescape:
            value = value.replace(escaped, char)
        return value
    frame.columns = [plain(c) for c in frame.columns]
    return frame.map(plain)


def test_latex_and_csv_round_trip_through_pandas(runs, report):
    """tables/*.csv hold numbers as numbers (a column's shown number, then '<column> stderr', '<column> n', ...), each
    equal to what the LaTeX table prints; text columns are the same text."""
    tex = (report / "tables.tex").read_text()
    slugs = [p.stem for p in (report / "tables").glob("*.csv")]
    assert {"by-model", "by-task", "niah-by-length", "niah-by-depth", "efficiency"} <= set(slugs)
    numeric_columns = 0
    for slug in slugs:
        from_csv = pd.read_csv(report / "tables" / f"{slug}.csv")
        from_tex = parse_latex_tabular(tex, slug)
        assert len(from_csv) == len(from_tex)
        for column in from_tex.columns:
            if not pd.api.types.is_numeric_dtype(from_csv[column]):
                assert list(from_csv[column].fillna("")) == list(from_tex[column]), (slug, column)
                continue
            numeric_columns += 1
            for index, printed in enumerate(from_tex[column]):
                value = from_csv[column].iloc[index]
                shown = re.match(r"[+-]?\d+(\.\d+)?", printed)
                if pd.isna(value):
                    assert shown is None, (slug, column, printed)
                    continue
                decimals = len(shown.group(1) or ".") - 1
                assert float(shown.group()) == pytest.approx(value, abs=0.51 * 10 ** -decimals), (slug, column, printed)
                n = re.search(r"\(n=(\d+)\)", printed)
                if n and f"{column} n" in from_csv:
                    assert from_csv[f"{column} n"].iloc[index] == int(n.group(1))
    assert numeric_columns >= 10
    by_task = pd.read_csv(report / "tables" / "by-task.csv")
    niah = metrics(runs["full"])["niah"]
    row = by_task[by_task.Task == "niah"].iloc[0]
    assert row["Llama-Full"] == niah["metrics"]["accuracy"]["mean"]
    assert row["Llama-Full stderr"] == pytest.approx(niah["metrics"]["accuracy"]["stderr"])
    assert row["Llama-Full n"] == niah["n"] and by_task["Llama-Full n"].dtype.kind == "i"
    assert {"\u0394 Llama-NSA vs Llama-Full low", "\u0394 Llama-NSA vs Llama-Full high"} <= set(by_task.columns)


def test_publish_writes_a_committable_folder(report, tmp_path):
    target = publish(report, "nsa-vs-full", results_dir=tmp_path)
    readme = (target / "README.md").read_text()
    assert readme == (report / "report.md").read_text()
    for link in re.findall(r"\]\((figures/[^)]+\.png)\)", readme):
        assert (target / link).is_file(), link
    assert (target / "results.csv").is_file() and (target / "report.html").is_file()
    for run_id in ("full-1", "nsa-1", "nsa-v2"):
        assert json.loads((target / "runs" / run_id / "run.json").read_text())["run_id"] == run_id
    with pytest.raises(ValueError, match="already exists"):
        publish(report, "nsa-vs-full", results_dir=tmp_path)


def test_longbench_in_the_papers_table2_form_with_a_subset_by_length_heatmap(tmp_path):
    runs = [write_run(tmp_path, "a", "Full", {"longbench": longbench(0.4)}),
            write_run(tmp_path, "b", "NSA", {"longbench": longbench(0.5, seed=1)})]
    build_report(runs, tmp_path / "out", reference="nsa-paper", formats=("md",))
    md = (tmp_path / "out" / "report.md").read_text()
    table = markdown_table(md, "longbench by subset")
    assert list(table.columns) == ["Model", "hotpotqa", "lcc", "qasper", "Avg"]
    subsets = metrics(runs[1])["longbench"]["breakdowns"]["subset"]
    nsa = table[table.Model == "NSA"].iloc[0]
    for subset, cell in subsets.items():
        assert nsa[subset] == f"{cell['score']['mean']:.3f} (n={cell['score']['n']})"
    assert nsa["Avg"] == f"{sum(c['score']['mean'] for c in subsets.values()) / 3:.3f}"
    paper = table[table.Model.str.startswith("NSA (paper)")].iloc[0]
    assert (paper["hotpotqa"], paper["qasper"], paper["lcc"]) == ("0.437", "0.432", "0.232")
    assert "![NSA: longbench by subset x length](figures/longbench-subset-x-length-b.png)" in md
    assert (tmp_path / "out" / "figures" / "longbench-subset-x-length-b-minus-a.png").is_file()


def test_kernel_speed_from_bench_files(runs, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    write_bench(bench)
    (bench / "kernels-broken.json").write_text("{")
    build_report([runs["full"]], tmp_path / "out", reference="nsa-paper", formats=("md", "csv"), bench_dir=bench)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"Note: {bench / 'kernels-broken.json'} skipped:" in md
    fwd = markdown_table(md, "prefill fwd on NVIDIA H100 80GB HBM3: median ms, and speedup (baseline time / time)")
    assert list(fwd.columns) == ["Implementation", "8192", "16384", "32768", "65536"]
    assert fwd[fwd.Implementation == "ours full (ms)"].iloc[0]["16384"] == "4.000"
    assert fwd[fwd.Implementation == "ours full vs sdpa flash"].iloc[0]["65536"] == "1.10x"
    notes = section(md, "prefill fwd on NVIDIA H100 80GB HBM3: median ms, and speedup (baseline time / time)")
    assert "sdpa cudnn T=65536: OutOfMemoryError" in notes
    decode = markdown_table(md, "decode b=1 on NVIDIA H100 80GB HBM3: median ms, and speedup (baseline time / time)")
    assert decode[decode.Implementation == "ours full vs sdpa"].iloc[0]["8192"] == "1.67x"
    paper = markdown_table(md, "NSA paper: NSA speedup over full attention (Figure 6 on A100; Table 4 expected decode)")
    assert paper[paper.Quantity == "forward (kernel)"].iloc[0]["65536"] == "9.0x"
    assert "![Kernel speedup on NVIDIA H100 80GB HBM3](figures/kernels-nvidia-h100.png)" in md
    # without --bench-dir the report has no kernel tables, even with bench files in ./results/bench
    monkeypatch.chdir(tmp_path)
    shutil.copytree(bench, tmp_path / "results" / "bench")
    build_report([runs["full"]], tmp_path / "plain", formats=("md",))
    plain = (tmp_path / "plain" / "report.md").read_text()
    assert "Kernel speedup" not in plain and "median ms" not in plain
    # a --bench-dir without bench files is refused before anything is written
    with pytest.raises(ValueError, match="--bench-dir .*missing holds no kernels-<card>.json"):
        build_report([runs["full"]], tmp_path / "refused", formats=("md",), bench_dir=tmp_path / "missing")
    assert not (tmp_path / "refused").exists()


def test_different_prompts_are_flagged_and_not_compared(tmp_path):
    """Same task version, another grid: the prompts digests differ, so the runs are shown apart."""
    runs = [write_run(tmp_path, "a", "Full", {"niah": niah(lambda length, depth: 0.9, lengths=(1024, 2048))}),
            write_run(tmp_path, "b", "NSA", {"niah": niah(lambda length, depth: 0.9, lengths=(1024, 4096))})]
    build_report(runs, tmp_path / "out", baseline="a", formats=("md",))
    md = (tmp_path / "out" / "report.md").read_text()
    by_task = markdown_table(md, "Scores by task and metric (mean \u00b1 standard error)")
    row = by_task[by_task.Task == "niah"].iloc[0]
    assert row["\u0394 NSA vs Full"].startswith("n/a[")
    notes = section(md, "Scores by task and metric (mean \u00b1 standard error)")
    assert re.search(r"NSA: niah is not comparable with Full \(prompts differ \(digest \w+ vs \w+\)\)", notes)
    assert not list((tmp_path / "out" / "figures").glob("*-minus-*"))


def test_per_task_runs_of_one_model_merge_into_one_row(tmp_path):
    """Per-task runs of two models (a folder per task) give one row per model, with an average and deltas on both
    tasks, rather than four rows and 'not run' notes; the Runs table still lists every folder."""
    small = dict(lengths=(1024, 2048), depths=(0, 50), per_cell=3)
    folders = [write_run(tmp_path / "full", "niah", "Llama-Full", {"niah": niah(lambda length, depth: 0.8, **small)}),
               write_run(tmp_path / "full", "mmlu", "Llama-Full", {"mmlu": choice_task(0.5, n=20, seed=1)}),
               write_run(tmp_path / "nsa", "niah", "Llama-NSA", {"niah": niah(lambda length, depth: 0.9, seed=2, **small)}),
               write_run(tmp_path / "nsa", "mmlu", "Llama-NSA", {"mmlu": choice_task(0.7, n=20, seed=1)})]
    run_info = json.loads((folders[2] / "run.json").read_text())  # the NSA runs: sparse attention settings
    for folder in folders[2:]:
        info = json.loads((folder / "run.json").read_text())
        info.update(attention="sparse", sparse={"budget": 384, "leading": 64, "local": 128, "block": 32})
        (folder / "run.json").write_text(json.dumps(info))
    assert run_info["run_id"] == "niah"  # two folders per run id: runs are keyed by folder
    out = tmp_path / "report"
    build_report(folders, out, baseline=str(folders[0]), formats=("md", "csv"))
    md = (out / "report.md").read_text()
    by_model = markdown_table(md, "Scores by model (headline metric of each task)")
    assert list(by_model.Model) == ["Llama-Full (baseline)", "Llama-NSA"]
    assert "was not run" not in md and not any(DASH in cell for cell in by_model.iloc[:, 1:].values.ravel())
    nsa = by_model.iloc[1]
    expected = (metrics(folders[2])["niah"]["metrics"]["accuracy"]["mean"] + metrics(folders[3])["mmlu"]["metrics"]["acc"]["mean"]) / 2
    assert nsa["Avg"] == f"{expected:.3f}"
    by_task = markdown_table(md, "Scores by task and metric (mean \u00b1 standard error)")
    assert all(not cell.startswith(("n/a", DASH)) for cell in by_task["\u0394 Llama-NSA vs Llama-Full"])
    runs_table = markdown_table(md, "Runs")
    assert len(runs_table) == 4 and list(runs_table.Column) == ["Llama-Full (baseline)"] * 2 + ["Llama-NSA"] * 2
    assert all("sparse attention (budget 384, leading 64, local 128, block 32)" in s for s in runs_table.Settings[2:])
    assert all(s.startswith("full attention") for s in runs_table.Settings[:2])
    assert {p.name for p in (out / "runs").iterdir()} == {"full-niah", "full-mmlu", "nsa-niah", "nsa-mmlu"}
    long = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert set(long[long.column == "Llama-NSA"].run_dir) == {str(folders[2]), str(folders[3])}
    separate = tmp_path / "separate"
    build_report(folders, separate, formats=("md",), merge=False)
    assert len(markdown_table((separate / "report.md").read_text(), "Scores by model (headline metric of each task)")) == 4


def test_paper_style_figures_in_three_formats_and_out_never_a_run_folder(runs, tmp_path):
    out = tmp_path / "paper"
    build_report([runs["full"], runs["nsa"]], out, baseline="full-1", paper=True)
    md = (out / "report.md").read_text()
    by_model = markdown_table(md, "Scores by model (headline metric of each task)")
    assert list(by_model.columns) == ["Model", "NIAH", "MMLU", "GSM8K", "Avg"]
    assert not any("(n=" in cell for cell in by_model.values.ravel())
    notes = section(md, "Scores by model (headline metric of each task)")
    assert "settings: NIAH accuracy; MMLU 5-shot acc; GSM8K 8-shot acc" in notes
    assert "n (samples per cell): NIAH 60; MMLU 200; GSM8K 60" in notes
    by_task = section(md, "Scores by task and metric (mean \u00b1 standard error)")
    assert "(n=" not in by_task.split("\n\n")[0] and "n (samples per cell): " in by_task
    for figure in (out / "figures").glob("*.png"):
        assert figure.with_suffix(".svg").read_text().startswith("<?xml")
        assert figure.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert "(also [SVG](figures/niah-by-length.svg) and [PDF](figures/niah-by-length.pdf))" in md
    before = sorted(p.name for p in runs["full"].iterdir())
    with pytest.raises(ValueError, match=f"--out {runs['full']} is a run directory; write the report elsewhere"):
        build_report([runs["full"]], runs["full"])
    assert sorted(p.name for p in runs["full"].iterdir()) == before
