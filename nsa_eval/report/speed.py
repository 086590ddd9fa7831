"""Kernel speed from `nsa-eval bench kernels` (results/bench/kernels-<card>.json) as tables and figures.

A bench file is a list of rows (or {"rows": [...], ...}), each with a case name ("case" or "name"), the
sequence length "T", the time "ms", and ratios: numeric fields named *speedup* or *ratio* (ours over the
full-attention kernel at the same T). Rows without T or ms are skipped; a file that is not such a list is
reported in a note, never fatal: speed is an addition to the report, not its subject.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsa_eval.report import figures, reference
from nsa_eval.report.tables import Cell, Table

RATIO_WORDS = ("speedup", "ratio")


@dataclass
class BenchFile:
    card: str  # from the file name: kernels-<card>.json
    path: Path
    rows: list[dict[str, Any]]
    ratio_keys: list[str] = field(default_factory=list)


def read_bench(bench_dir: Path) -> tuple[list[BenchFile], list[str]]:
    """The kernel bench files under bench_dir (missing folder: none) and a note per file that could not be read."""
    files, problems = [], []
    if not bench_dir.is_dir():
        return files, problems
    for path in sorted(bench_dir.glob("kernels-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"{path} skipped: {error}")
            continue
        raw = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(raw, list):
            problems.append(f"{path} skipped: no list of rows")
            continue
        rows = [_row(r) for r in raw if isinstance(r, dict)]
        rows = [r for r in rows if r is not None]
        if not rows:
            problems.append(f"{path} skipped: no row with a case, T and ms")
            continue
        ratio_keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("case", "T", "ms")))
        files.append(BenchFile(path.stem.removeprefix("kernels-"), path, rows, ratio_keys))
    return files, problems


def _row(raw: dict[str, Any]) -> dict[str, Any] | None:
    case = raw.get("case", raw.get("name"))
    try:
        row = {"case": str(case), "T": int(raw["T"]), "ms": float(raw["ms"])}
    except (KeyError, TypeError, ValueError):
        return None
    if case is None:
        return None
    for key, value in raw.items():
        if any(word in key.lower() for word in RATIO_WORDS) and isinstance(value, (int, float)):
            row[key] = float(value)
    return row


def bench_table(bench: BenchFile) -> Table:
    """Every row of one bench file: case, T, ms and its ratios."""
    table = Table(f"kernels-{bench.card}", f"Kernel times on {bench.card} ({bench.path.name})",
                  ["Case", "T", "ms", *bench.ratio_keys])
    for row in sorted(bench.rows, key=lambda r: (r["case"], r["T"])):
        cells = [Cell(row["case"]), Cell(str(row["T"]), row["T"]), Cell(f"{row['ms']:.3f}", row["ms"])]
        cells += [Cell(f"{row[k]:.2f}x", row[k]) if k in row else Cell("\u2014") for k in bench.ratio_keys]
        table.rows.append(cells)
    return table


def _direction(case: str) -> str | None:
    name = case.lower()
    if "decode" in name:
        return "decode"
    if "bwd" in name or "backward" in name:
        return "backward"
    if "fwd" in name or "forward" in name:
        return "forward"
    return None


def speedup_figure(bench: BenchFile, with_paper: bool) -> bytes | None:
    """Speedup against T, one line per case and ratio (the paper's Figure 6 and Table 4 as dashed lines)."""
    series: dict[str, dict[int, float]] = {}
    for row in bench.rows:
        for key in bench.ratio_keys:
            if key in row:
                series.setdefault(f"{row['case']} {key}", {})[row["T"]] = row[key]
    if not series:
        return None
    dashed = {}
    if with_paper:
        directions = {_direction(row["case"]) for row in bench.rows}
        for direction, points in reference.kernel_speedups().items():
            if direction in directions:
                dashed[f"paper {direction} (A100, Fig. 6)"] = points
        if "decode" in directions:
            dashed["paper decode, expected (Table 4)"] = reference.decode_speedups()
    return figures.speed_lines(f"Kernel speedup on {bench.card}", series, "speedup (x)", dashed)


def paper_speed_table() -> Table:
    """The paper's Figure 6 and Table 4 numbers, for reports asked for the reference."""
    kernel = reference.kernel_speedups()
    decode = reference.decode_speedups()
    lengths = sorted({*decode, *(t for points in kernel.values() for t in points)})
    table = Table("paper-speed", "NSA paper: speedup over full attention (Figure 6 on A100, Table 4 expected decode)",
                  ["Quantity", *map(str, lengths)])
    for label, points in (("forward (kernel)", kernel["forward"]), ("backward (kernel)", kernel["backward"]),
                          ("decode (expected)", decode)):
        table.rows.append([Cell(label), *(Cell(f"{points[t]:.1f}x", points[t]) if t in points else Cell("\u2014")
                                          for t in lengths)])
    return table
