"""`nsa-eval report` and `nsa-eval publish`: runs in, a report folder out, and a report folder into results/NAME/.

A report folder holds:
  report.md            tables and figure links (README.md once published)
  report.html          one self-contained file with sortable tables and per-sample drill-down
  tables.tex           every table as a booktabs LaTeX table
  results.csv          one row per run, task, metric and breakdown cell, with deltas against the baseline
  tables/<slug>.csv    every table, numbers as numbers (a column's mean, then "<column> stderr", "<column> n")
  figures/<slug>.png   heatmaps, difference maps, score by length, kernel speedups (also .svg and .pdf)
  runs/<key>/run.json  what produced each column (one folder per run folder; key: the run id, made unique)
  report.json          what the report was made from (read by publish)
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from nsa_eval.report import FORMATS, RESULTS_DIR, figures, html, speed
from nsa_eval.report.benchmark_tables import benchmark_tables
from nsa_eval.report.comparisons import compare, long_records, mismatch, reference_run, report_tasks
from nsa_eval.report.cost import cost_parts, efficiency_table, hardware_text
from nsa_eval.report.reference import PAPER_NAME
from nsa_eval.report.runs import Run, load_runs
from nsa_eval.report.score_tables import (POSITION_KEYS, breakdown_table, cross_table, model_table, position_table,
                                          subset_table, task_table)
from nsa_eval.report.sweeps import budget_sweeps, sweep_section
from nsa_eval.report.table import Cell, Details, FigureFile, Section, Table, slug, to_frame, to_latex, to_markdown

SUBSET_KEYS = ("subset", "dataset")


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown report format '{','.join(unknown) or text}'; choose from {','.join(FORMATS)}")
    return formats


def find_baseline(runs: list[Run], name: str) -> int:
    """Index of the column holding the run named by name (a column's label, a run's key or id, or its directory); a
    name that names runs in several columns is refused, naming them."""
    found = [index for index, run in enumerate(runs) if name in (run.label, run.full_label)]
    if not found:
        found = list(dict.fromkeys(
            index for index, run in enumerate(runs) for part in run.folders
            if name in (part.run_id, part.key) or (Path(name).exists() and Path(name).resolve() == part.path.resolve())))
    if len(found) > 1:
        raise ValueError(f"baseline '{name}' names runs in {len(found)} columns ("
                         + ", ".join(runs[i].label for i in found) + "); give its folder")
    if found:
        return found[0]
    raise ValueError(f"baseline '{name}' is not among the runs ({', '.join(p.key for r in runs for p in r.folders)}); "
                     "add it to the RUN arguments or name one of them")


def settings_text(info: dict) -> str:
    """A run's attention, numeric and engine settings in a few words, for the Runs table."""
    parts = []
    sparse = info.get("sparse")
    if info.get("attention") == "sparse" and isinstance(sparse, dict):
        parts.append("sparse attention (" + ", ".join(f"{k} {v}" for k, v in sparse.items()) + ")")
    elif info.get("model_attention") not in (None, "full"):
        parts.append(f"{'NSA' if info['model_attention'] == 'nsa' else info['model_attention']} attention (the "
                     "checkpoint's own)")
    else:
        parts.append(f"{info.get('attention') or 'full'} attention")
    parts.append(" ".join(str(info[k]) for k in ("device", "dtype") if info.get(k)))
    model = info.get("model") or {}
    if model.get("max_length"):
        parts.append(f"max length {model['max_length']}")
    if model.get("chat") is not None:
        parts.append("chat template" if model["chat"] else "plain prompts")
    for key, label in (("batch_size", "batch"), ("prefill_chunk", "prefill chunk"), ("max_new_tokens", "max new tokens"),
                       ("limit", "limit"), ("seed", "seed"), ("world_size", "processes")):
        if info.get(key) is not None:
            parts.append(f"{label} {info[key]}")
    return "; ".join(p for p in parts if p)


def runs_table(runs: list[Run], baseline: int | None) -> Table:
    """A row per run folder (a merged column lists each of its folders)."""
    table = Table("runs", "Runs", ["Column", "Run id", "Folder", "Model spec", "Settings", "Created", "Tasks", "git",
                                   "Hardware", "torch"])
    for index, column in enumerate(runs):
        cut = ((table.note(f"{column.label}: {column.full_label}"),)
               if column.full_label and column.full_label != column.label else ())
        for run in column.folders:
            info = run.info
            table.rows.append([Cell(column.label + (" (baseline)" if index == baseline else ""), notes=cut), Cell(run.run_id),
                               Cell(str(run.path)), Cell(str(info["model"].get("spec", ""))), Cell(settings_text(info)),
                               Cell(str(info.get("created", ""))), Cell(", ".join(run.results) or "\u2014"),
                               Cell(str(info.get("git_sha", ""))[:12]), Cell(hardware_text(run)),
                               Cell(str((info.get("versions") or {}).get("torch", "")))])
    return table


def _task_section(runs: list[Run], task: str, baseline: int | None, with_paper: bool, paper: bool = False,
                  seed: int = 0) -> Section:
    section = Section(f"Task: {task}")
    keys = list(dict.fromkeys(k for run in runs if task in run.results for k in run.results[task].breakdowns))
    before_cost, after_cost = benchmark_tables(runs, task, keys, baseline, with_paper, seed)
    cost_tables, cost_figures = cost_parts(runs, task, baseline)
    section.tables += before_cost + cost_tables + after_cost
    section.figures += cost_figures
    for key in keys:
        if " x " in key:
            continue
        if key in SUBSET_KEYS:
            section.tables.append(subset_table(runs, task, key, baseline, with_paper, paper))
        elif key in POSITION_KEYS:
            section.tables.append(position_table(runs, task, key, baseline, paper))
        else:
            section.tables.append(breakdown_table(runs, task, key, baseline, paper))
    for cross_key in (k for k in keys if " x " in k):
        holders = [i for i, run in enumerate(runs) if task in run.results and cross_key in run.results[task].breakdowns]
        for index in holders:
            run = runs[index]
            section.figures.append(FigureFile(
                slug(f"{task}-{cross_key}-{run.source(task).key}"), f"{run.label}: {task} by {cross_key}",
                figures.breakdown_heatmap(run, task, cross_key)))
        reference_index = reference_run(runs, task, baseline)
        for index in holders:
            if index == reference_index or reference_index not in holders:
                continue
            base, run = runs[reference_index], runs[index]
            if mismatch(base.results[task], run.results[task]) is None:
                section.figures.append(FigureFile(
                    slug(f"{task}-{cross_key}-{run.source(task).key}-minus-{base.source(task).key}"),
                    f"{run.label} \u2212 {base.label}: {task} by {cross_key}",
                    figures.difference_map(run, base, task, cross_key)))
        section.details.append(Details(f"{task} by {cross_key}, per run (click a cell for its samples)",
                                       [cross_table(runs, index, task, cross_key) for index in holders]))
    length_keys = [k for k in keys if " x " not in k and ("length" in k or k in POSITION_KEYS)]
    if length_keys:
        reference_index = reference_run(runs, task, baseline)
        apart = {run.key: f" (not comparable: {reason})" for run in runs if task in run.results
                 and (reason := mismatch(runs[reference_index].results[task], run.results[task]))}
        section.figures.append(FigureFile(slug(f"{task}-by-{length_keys[0]}"), f"{task} by {length_keys[0]}",
                                          figures.score_by_key(runs, task, length_keys[0], apart)))
    return section


def _speed_section(runs: list[Run], bench_dir: Path | None, with_paper: bool) -> Section | None:
    """The runs' own speed and cost (prefill ms, decode tokens/s and ms per token, KV bytes per step, share attended;
    report/cost.py), and kernel tables only from the bench_dir asked for."""
    section = Section("Speed")
    efficiency = efficiency_table(runs)
    if efficiency:
        section.tables.append(efficiency)
    bench_files, skipped = speed.read_bench(bench_dir) if bench_dir is not None else ([], [])
    section.notes += skipped
    for bench in bench_files:
        section.tables += speed.bench_tables(bench)
        files = speed.speedup_figure(bench, with_paper)
        if files:
            section.figures.append(FigureFile(f"kernels-{slug(bench.card)}", f"Kernel speedup on {bench.device}", files,
                                              wide=True))
    if with_paper and bench_files:
        section.tables.append(speed.paper_speed_table())
    return section if section.tables or section.notes else None


def build_report(
    run_args: list[str | Path],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    reference: str | None = None,
    formats: tuple[str, ...] = FORMATS,
    bench_dir: str | Path | None = None,
    seed: int = 0,
    paper: bool = False,
    merge: bool = True,
) -> list[Path]:
    """Write the report of the runs into out_dir; returns the files written (report.md first when asked).
    paper: the paper style (short headers, no n in cells, a note with the n); merge: one column per model and
    settings for runs holding different tasks; bench_dir: a folder of kernels-<card>.json whose kernel speed tables
    join the runs' own speed (none without it: a report shows only what was asked for)."""
    if reference not in (None, PAPER_NAME):
        raise ValueError(f"unknown reference '{reference}'; the one known is '{PAPER_NAME}'")
    formats = tuple(formats)
    parse_formats(",".join(formats))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the report")
    if (out / "run.json").exists() or (out / "metrics.json").exists():
        raise ValueError(f"--out {out} is a run directory; write the report elsewhere, e.g. --out {out / 'report'}")
    if bench_dir is not None and not any(Path(bench_dir).glob("kernels-*.json")):
        raise ValueError(f"--bench-dir {bench_dir} holds no kernels-<card>.json; give the folder `nsa-eval bench kernels` "
                         "wrote (results/bench), or leave --bench-dir out for a report without kernel tables")
    runs = load_runs(list(run_args), merge=merge)
    base = find_baseline(runs, baseline) if baseline is not None else None
    with_paper = reference == PAPER_NAME

    comparisons = compare(runs, base, seed=seed) if base is not None else {}
    scores = Section("Scores", [model_table(runs, base, with_paper, paper), task_table(runs, base, comparisons, paper)])
    sections = [scores, *(sweep_section(runs, sweep) for sweep in budget_sweeps(runs)),
                *(_task_section(runs, task, base, with_paper, paper, seed) for task in report_tasks(runs)
                  if any(task in run.results for run in runs))]
    speed_section = _speed_section(runs, Path(bench_dir) if bench_dir is not None else None, with_paper)
    if speed_section:
        sections.append(speed_section)
    header = runs_table(runs, base)
    title = "nsa-eval report: " + ", ".join(run.label for run in runs)

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    all_figures = [f for s in sections for f in s.figures]
    if all_figures:
        (out / "figures").mkdir(exist_ok=True)
        for figure in all_figures:
            for kind, data in figure.files.items():
                path = out / "figures" / f"{figure.slug}.{kind}"
                path.write_bytes(data)
                written.append(path)
    if "md" in formats:
        written.insert(0, _write(out / "report.md", _markdown(title, header, sections)))
    if "html" in formats:
        written.append(_write(out / "report.html", html.render(title, runs, header, sections)))
    tables = [t for s in sections for t in s.tables]
    if "latex" in formats:
        written.append(_write(out / "tables.tex", "% needs \\usepackage{booktabs}\n" + "\n".join(map(to_latex, tables))))
    if "csv" in formats:
        (out / "tables").mkdir(exist_ok=True)
        for table in tables:
            path = out / "tables" / f"{table.slug}.csv"
            to_frame(table).to_csv(path, index=False)
            written.append(path)
        path = out / "results.csv"
        pd.DataFrame(long_records(runs, comparisons)).to_csv(path, index=False)
        written.append(path)
    for run in (part for column in runs for part in column.folders):
        target = out / "runs" / run.key
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.path / "run.json", target / "run.json")
        written.append(target / "run.json")
    manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "title": title,
                "runs": [{"run_id": part.run_id, "key": part.key, "label": column.label, "path": str(part.path)}
                         for column in runs for part in column.folders],
                "baseline": runs[base].key if base is not None else None, "reference": reference, "paper": paper,
                "formats": list(formats), "files": [str(p.relative_to(out)) for p in written]}
    written.append(_write(out / "report.json", json.dumps(manifest, indent=2) + "\n"))
    return written


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _markdown(title: str, header: Table, sections: list[Section]) -> str:
    parts = [f"# {title}\n", to_markdown(header)]
    for section in sections:
        parts.append(f"## {section.title}\n")
        parts += [f"Note: {note}\n" for note in section.notes]
        parts += [to_markdown(table) for table in section.tables]
        parts += [f"![{figure.title}](figures/{figure.slug}.png)\n\n(also [SVG](figures/{figure.slug}.svg) and "
                  f"[PDF](figures/{figure.slug}.pdf))\n" for figure in section.figures]
    return "\n".join(parts)


def publish(report_dir: str | Path, name: str, *, results_dir: str | Path = RESULTS_DIR, force: bool = False) -> Path:
    """Copy a report into results/<name>/: README.md (the Markdown report), figures, CSV, LaTeX, HTML, run.json files."""
    source = Path(report_dir)
    manifest_path = source / "report.json"
    if not manifest_path.is_file():
        raise ValueError(f"{source} is not a report folder (no report.json); make one with `nsa-eval report RUN... --out DIR`")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in ("runs", "bench"):
        raise ValueError(f"--name '{name}' is not a usable folder name; use letters, digits, '.', '_' or '-' "
                         "(and not 'runs' or 'bench')")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = [Path(f) for f in manifest["files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path} is corrupt ({error}); make the report again") from None
    if not (source / "report.md").is_file():
        raise ValueError(f"{source} has no report.md; make the report with --format including md")
    target = Path(results_dir) / name
    if target.exists() and not force:
        raise ValueError(f"{target} already exists; choose another --name or pass --force to replace it")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for relative in files:
        if relative.name == "report.json" or not (source / relative).is_file():
            continue
        destination = target / ("README.md" if relative == Path("report.md") else relative)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, destination)
    shutil.copyfile(manifest_path, target / "report.json")
    return target
