"""The `nsa-eval report` and `nsa-eval publish` commands (registered in nsa_eval/cli.py).

Bad input raises ValueError; the `nsa-eval` group turns it into one line and exit code 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from nsa_eval.report import FORMATS, RESULTS_DIR
from nsa_eval.report.reference import PAPER_NAME
from nsa_eval.report.runs import resolve_run_dir


@click.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Folder for the report. Default: <first RUN>/report.")
@click.option("--baseline", metavar="RUN",
              help="A run among RUN... (run id or directory) that the others are compared with: each score gets a "
                   "delta with a paired bootstrap 95% interval over the samples both runs scored.")
@click.option("--reference", type=click.Choice([PAPER_NAME]),
              help="Add the NSA paper's reported numbers (arXiv:2502.11089, a 27B MoE) as reference rows.")
@click.option("--format", "formats", default=",".join(FORMATS), show_default=True,
              help="Comma-separated outputs: md (report.md), html (one self-contained report.html with per-sample "
                   "drill-down), latex (tables.tex), csv (results.csv and tables/*.csv, numbers as numbers). Figures are "
                   "always written, as PNG, SVG and PDF.")
@click.option("--bench-dir", type=click.Path(path_type=Path),
              help="Add kernel speed tables and figures from the kernels-<card>.json that `nsa-eval bench kernels` wrote "
                   "there (e.g. results/bench). Without it the speed section holds only the runs' own speed.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap resampling.")
@click.option("--paper", is_flag=True,
              help="The paper style: short column heads (MMLU, GSM8K, ...), no n in the cells, a note with the n of "
                   "each column and the settings.")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Runs of one model and settings (model spec, max length, chat, attention, dtype, device) holding "
                   "different tasks become one column (one row per model), e.g. per-task runs.")
def report(runs: tuple[str, ...], out_dir: Path | None, baseline: str | None, reference: str | None, formats: str,
           bench_dir: Path | None, seed: int, paper: bool, merge: bool) -> None:
    """Tables, heatmaps and an HTML report from one or more run directories (or run ids under results/runs/); a budget
    sweep's folder stands for its runs (one per --sparse-budget)."""
    from nsa_eval.report.build import build_report, parse_formats  # matplotlib and pandas: only when reporting

    out = out_dir or resolve_run_dir(runs[0]) / "report"
    written = build_report(list(runs), out, baseline=baseline, reference=reference, formats=parse_formats(formats),
                           bench_dir=bench_dir, seed=seed, paper=paper, merge=merge)
    for path in written:
        if path.suffix in (".md", ".html", ".tex") or (path.parent.name == "figures" and path.suffix == ".png"):
            click.echo(f"wrote {path}" + (" (and .svg, .pdf)" if path.suffix == ".png" else ""))
    click.echo(f"report folder: {out} (publish it with `nsa-eval publish {out} --name NAME`)")


@click.command()
@click.argument("report_dir", type=click.Path(path_type=Path), metavar="REPORT_DIR")
@click.option("--name", required=True, help="Folder name under results/ (letters, digits, '.', '_', '-').")
@click.option("--results-dir", type=click.Path(path_type=Path), default=RESULTS_DIR, show_default=True,
              help="Where published result sets live (committed to git).")
@click.option("--force", is_flag=True, help="Replace results/NAME if it exists.")
def publish(report_dir: Path, name: str, results_dir: Path, force: bool) -> None:
    """Copy a report folder into results/NAME/ (README.md with tables and figures, CSV, each run's run.json)."""
    from nsa_eval.report.build import publish as publish_report

    target = publish_report(report_dir, name, results_dir=results_dir, force=force)
    if _in_git_work_tree(target):
        click.echo(f"published {target}; commit it with `git add {target}`")
    else:
        click.echo(f"published {target}")


def _in_git_work_tree(path: Path) -> bool:
    import subprocess

    try:
        found = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=path, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 0 and found.stdout.strip() == "true"
