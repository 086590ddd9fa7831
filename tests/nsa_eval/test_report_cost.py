"""Cost beside accuracy (report/cost.py, issue 21): the per-length table of score, timings, KV bytes and share attended,
the speedups against the baseline (only between runs timed on one card), the Pareto figure, and the Speed table's new
rows; on hand-made runs shaped like the quickstart's and on real NIAH runs of the embedded model (slow)."""

import json
from pathlib import Path

import pytest

from cli_checks import invoke
from nsa_eval.report.build import build_report
from nsa_eval.report.figures import pareto_front
from nsa_eval.runner import efficiency
from report_runs import niah, write_run
from test_report_tables import markdown_table

QUICKSTART_GRID = dict(lengths=(512, 1024, 1536, 2048), depths=(0, 25, 50, 75, 100), per_cell=1)
PER_TOKEN = 46080  # SmolLM2-135M's key and value bytes per token in float32 (30 layers x 3 KV heads x 128 x 4)
FIGURE_FORMATS = ("png", "svg", "pdf")


def cost_run(root: Path, run_id: str, name: str, *, ms_per_token: float, prefill_per_token: float,
             budget: int | None, hardware: dict | None = None, device: str = "cpu", accuracy=lambda length: 1.0) -> Path:
    """A NIAH run on the quickstart's grid whose samples record the cost fields: decode ms per token and prefill ms
    proportional to the length, KV bytes of full attention (budget None) or of a sparse budget (block means left out
    here: the report shows what the samples say)."""
    data = niah(lambda length, depth: accuracy(length), **QUICKSTART_GRID)
    for record in data.records:
        length = record["breakdown"]["length"]
        tokens = min(length, budget) if budget else length
        record.update(prefill_ms=prefill_per_token * length, decode_ms_per_token=ms_per_token * length / 512,
                      decode_steps=4, kv_bytes_per_step=float(tokens * PER_TOKEN), attended_share=tokens / length,
                      new_tokens=[5])
    path = write_run(root, run_id, name, {"niah": data})
    info = json.loads((path / "run.json").read_text())
    info.update(device=device, engine="Engine", batch_size=8,
                hardware=hardware or {"platform": "Linux", "cpu_count": 2, "machine": "x86_64", "cpu": "AMD EPYC"})
    (path / "run.json").write_text(json.dumps(info))
    metrics = json.loads((path / "metrics.json").read_text())
    metrics["tasks"]["niah"]["efficiency"] = efficiency(data.records)  # the runner's own summary
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_the_report_of_a_full_baseline_and_a_sparse_run_has_cost_speedups_and_the_pareto_figure(tmp_path):
    full = cost_run(tmp_path, "full", "M", ms_per_token=10.0, prefill_per_token=0.1, budget=None)
    sparse = cost_run(tmp_path, "sparse", "M+sparse1024", ms_per_token=4.0, prefill_per_token=0.08, budget=1024,
                      accuracy=lambda length: float(length <= 1024))
    out = tmp_path / "report"
    build_report([full, sparse], out, baseline="full", formats=("md", "csv", "html", "latex"))
    text = (out / "report.md").read_text()
    table = markdown_table(text, "niah: accuracy and cost by context length")
    assert list(table.columns) == ["Length", "Model", "accuracy", "prefill ms", "decode ms/token", "new tokens",
                                   "KV MB/step", "share attended", "prefill speedup vs M", "decode speedup vs M"]
    assert list(table["Length"]) == ["512", "512", "1024", "1024", "1536", "1536", "2048", "2048"]
    assert list(table["Model"]) == ["M (baseline)", "M+sparse1024"] * 4
    rows = {(row["Length"], row["Model"]): row for _, row in table.iterrows()}
    for length in (512, 1024, 1536, 2048):
        base, run = rows[str(length), "M (baseline)"], rows[str(length), "M+sparse1024"]
        assert base["decode speedup vs M"] == base["prefill speedup vs M"] == "baseline"
        assert run["decode speedup vs M"] == "2.50x"  # 10 / 4 ms per token, at every length
        assert run["prefill speedup vs M"] == "1.25x"  # 0.1 / 0.08 ms per prompt token
        assert base["KV MB/step"] == f"{length * PER_TOKEN / 1e6:.3f}" and base["share attended"] == "1.000"
        assert run["KV MB/step"] == f"{min(length, 1024) * PER_TOKEN / 1e6:.3f}"
        assert run["share attended"] == f"{min(length, 1024) / length:.3f}"  # budget / context past the budget
        assert base["accuracy"] == "1.000 (n=5)" and run["accuracy"] == f"{float(length <= 1024):.3f} (n=5)"
        assert run["new tokens"] == "5.0" and run["decode ms/token"] == f"{4.0 * length / 512:.2f}"
    for kind in FIGURE_FORMATS:
        assert (out / "figures" / f"niah-pareto.{kind}").stat().st_size > 0
    assert "![niah: accuracy against decode time and KV bytes](figures/niah-pareto.png)" in text
    csv = (out / "tables" / "niah-cost.csv").read_text().splitlines()
    assert csv[0].startswith("Length,Model,accuracy,accuracy stderr,accuracy n,prefill ms,")
    speed = markdown_table(text, "Model speed measured during the runs")
    assert {"decode ms per token (mean)", "KV MB read per decode step (mean)", "share of the context attended (mean)",
            "new tokens (mean)"} <= set(speed["Quantity"])
    assert "niah: accuracy and cost by context length" in (out / "report.html").read_text()
    assert "prefill speedup vs M" in (out / "tables.tex").read_text()


def test_no_speedup_between_runs_timed_on_different_cards(tmp_path):
    full = cost_run(tmp_path, "full", "M", ms_per_token=10.0, prefill_per_token=0.1, budget=None)
    gpu = cost_run(tmp_path, "gpu", "M+sparse1024", ms_per_token=0.5, prefill_per_token=0.01, budget=1024,
                   device="cuda", hardware={"platform": "Linux", "cpu_count": 16, "gpu": "NVIDIA H100 80GB HBM3",
                                            "gpu_count": 1})
    other_cpu = cost_run(tmp_path, "other", "M+sparse512", ms_per_token=5.0, prefill_per_token=0.1, budget=512,
                         hardware={"platform": "Linux", "cpu_count": 2, "machine": "x86_64", "cpu": "Intel Xeon"})
    build_report([full, gpu, other_cpu], tmp_path / "report", baseline="M", formats=("md",))
    text = (tmp_path / "report" / "report.md").read_text()
    table = markdown_table(text, "niah: accuracy and cost by context length")
    notes = text.split("### niah: accuracy and cost by context length", 1)[1].split("###", 1)[0]

    def note_of(model: str, column: str) -> str:
        marks = set(table[table["Model"] == model][column])
        assert len(marks) == 1 and next(iter(marks)).startswith("\u2014[")  # a dash with a note, at every length
        number = next(iter(marks))[2:-1]
        return next(line for line in notes.splitlines() if line.startswith(f"[{number}] "))

    for column in ("decode speedup vs M", "prefill speedup vs M"):
        assert note_of("M+sparse1024", column) == (
            "[1] M+sparse1024: no speedup, measured on NVIDIA H100 80GB HBM3, the baseline on CPU AMD EPYC, 2 cores: a "
            "ratio across cards says nothing about the method  ")
        assert note_of("M+sparse512", column).startswith(
            "[2] M+sparse512: no speedup, measured on CPU Intel Xeon, 2 cores, the baseline on CPU AMD EPYC, 2 cores")
    assert (tmp_path / "report" / "figures" / "niah-pareto.png").is_file()  # the figure still shows each run's cost


def test_the_quickstart_s_report_shows_the_cost_columns(tmp_path):
    """One run on the quickstart's grid, no baseline (as `nsa-eval quickstart` reports it): the cost table without
    speedup columns, and the figure."""
    run = cost_run(tmp_path, "quickstart-smollm2", "SmolLM2-135M-Instruct", ms_per_token=30.0, prefill_per_token=0.2,
                   budget=None)
    result = invoke("report", run, "--out", tmp_path / "report")  # the command the quickstart invokes
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    table = markdown_table(text, "niah: accuracy and cost by context length")
    assert list(table.columns) == ["Length", "Model", "accuracy", "prefill ms", "decode ms/token", "new tokens",
                                   "KV MB/step", "share attended"]
    assert list(table["Length"]) == ["512", "1024", "1536", "2048"] and set(table["share attended"]) == {"1.000"}
    assert (tmp_path / "report" / "figures" / "niah-pareto.svg").is_file()


def test_runs_recorded_before_the_cost_fields_get_no_cost_table(tmp_path):
    old = write_run(tmp_path, "old", "M", {"niah": niah(lambda length, depth: 1.0)})
    build_report([old], tmp_path / "report", formats=("md",))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "and cost by context length" not in text and "pareto" not in text
    speed = markdown_table(text, "Model speed measured during the runs")
    assert list(speed["Quantity"]) == ["prefill ms (mean)", "decode tokens/s (mean)", "prompt tokens (mean)"]


@pytest.mark.parametrize("points, front", [
    ([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.2)], [3, 0, 1]),  # (3, 0.8) costs more than (2, 0.9) and scores less
    ([(1.0, 0.5), (1.0, 0.7)], [1]),  # same cost: the better score
    ([(2.0, 1.0), (1.0, 1.0)], [1]),  # same score: the cheaper
])
def test_the_pareto_front(points, front):
    assert pareto_front(points) == front


@pytest.mark.slow
def test_niah_runs_of_the_embedded_model_record_their_cost_and_report_it(tmp_path):
    """Real runs: SmolLM2 on NIAH (one length, --limit) with full attention, with sparse attention and as its NSA
    retrofit (smollm2-nsa); every sample records the cost fields, KV bytes per step equal the hand computation over its
    decode steps, the share attended is 1.0 for full attention and the budget's over the context for sparse; the report
    of the three has the cost table, the speedups (one card: this CPU) and the Pareto figure."""
    common = ["--tasks", "niah", "--niah-lengths", "512", "--niah-depths", "0,100", "--limit", "1",
              "--max-new-tokens", "5", "--quiet"]
    sparse_flags = ["--attention", "sparse", "--sparse-budget", "128", "--sparse-leading", "16", "--sparse-local", "32",
                    "--sparse-block", "16"]
    runs = (("full", ["--model", "smollm2"]), ("sparse", ["--model", "smollm2", *sparse_flags]),
            ("nsa", ["--model", "smollm2-nsa"]))
    for name, flags in runs:
        result = invoke("run", *common, *flags, "--output", tmp_path / name)
        assert result.exit_code == 0, result.output
    for name, _ in runs:
        records = [json.loads(line) for line in (tmp_path / name / "samples" / "niah.jsonl").read_text().splitlines()]
        assert len(records) == 1
        for record in records:
            steps, prompt = record["decode_steps"], record["prompt_tokens"]
            assert steps == record["new_tokens"][0] - 1 + (record["finish_reasons"][0] == "stop") and steps > 0
            assert record["prefill_ms"] > 0 and record["decode_ms_per_token"] > 0
            contexts = range(prompt + 1, prompt + steps + 1)
            if name == "full":
                hand = [t * PER_TOKEN for t in contexts]
                shares = [1.0 for _ in contexts]
            elif name == "nsa":  # l = d = l' = 64, n 16, w 512: 512 tokens fit the 16 blocks; the window reads them again
                hand = [(t + min(512, t) + ((t - 64) // 64 + 1)) * PER_TOKEN for t in contexts]
                shares = [1.0 for _ in contexts]
            else:  # 8 blocks of 16 tokens (the newest up to the new token) and the mean key of every complete block
                selected = [7 * 16 + (t - 16 * ((t + 15) // 16 - 1)) for t in contexts]
                hand = [s * PER_TOKEN + (t // 16) * 30 * 3 * 64 * 4 for s, t in zip(selected, contexts)]
                shares = [s / t for s, t in zip(selected, contexts)]
                assert all(113 <= s <= 128 for s in selected)  # 7 whole blocks and 1 to 16 tokens of the newest
            assert record["kv_bytes_per_step"] == pytest.approx(sum(hand) / steps, abs=0.05)
            assert record["attended_share"] == pytest.approx(sum(shares) / steps, abs=1e-6)
        summary = json.loads((tmp_path / name / "metrics.json").read_text())["tasks"]["niah"]["efficiency"]
        assert summary["kv_bytes_per_step_mean"] == pytest.approx(
            sum(r["kv_bytes_per_step"] for r in records) / len(records))
    assert json.loads((tmp_path / "full" / "run.json").read_text())["hardware"]["cpu_count"] >= 1

    result = invoke("report", *(tmp_path / name for name, _ in runs), "--baseline", "SmolLM2-135M-Instruct",
                    "--out", tmp_path / "report", "--format", "md,csv")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    table = markdown_table(text, "niah: accuracy and cost by context length")
    assert list(table["Model"]) == ["SmolLM2-135M-Instruct (baseline)", "SmolLM2-135M-Instruct+sparse128",
                                    "SmolLM2-135M-Instruct-NSA"]
    for speedup in table["decode speedup vs SmolLM2-135M-Instruct"][1:]:
        assert speedup.endswith("x") and float(speedup[:-1]) > 0  # one card: a ratio, whatever this CPU's load made it
    for kind in FIGURE_FORMATS:
        assert (tmp_path / "report" / "figures" / f"niah-pareto.{kind}").stat().st_size > 0
