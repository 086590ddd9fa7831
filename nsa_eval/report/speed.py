"""Kernel speed from `nsa-eval bench kernels` (results/bench/kernels-<card>.json, nsa_eval/bench/kernels.py) as
tables and figures.

A bench file holds {"device", "card", "checks": [...], "rows": [...]}; a row has "op" (rows of one op
compare: "prefill fwd", "prefill fwd+bwd", "decode b=16"), "impl", "T", "ms" (median), and ratio fields
"vs <impl>" = that implementation's time / this row's time (> 1: this row is faster), or "error".
Speed is an addition to a report, not its subject: a file that cannot be read becomes a note, never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsa_eval.report import figures, reference
from nsa_eval.report.table import DASH, Cell, Table, slug


@dataclass
class BenchFile:
    card: str
    device: str
    path: Path
    rows: list[dict[str, Any]]  # rows with a time; failed rows are in `problems`
    problems: list[str]  # failed rows and failed correctness checks, as notes

    def ops(self) -> list[str]:
        return list(dict.fromkeys(row["op"] for row in self.rows))

    def baselines(self) -> set[str]:
        """Implementations others are measured against (their speedups over each other are left out)."""
        return {base for row in self.rows for base in row["ratios"]}


def read_bench(bench_dir: Path) -> tuple[list[BenchFile], list[str]]:
    """The kernel bench files under bench_dir (a missing folder: none) and a line per file that was skipped."""
    files, skipped = [], []
    if not bench_dir.is_dir():
        return files, skipped
    for path in sorted(bench_dir.glob("kernels-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            skipped.append(f"{path} skipped: {error}")
            continue
        raw = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(raw, list):
            skipped.append(f"{path} skipped: no list of rows")
            continue
        rows, problems = [], []
        for item in raw:
            row = _row(item) if isinstance(item, dict) else None
            if row is not None:
                rows.append(row)
            elif isinstance(item, dict) and "error" in item:
                problems.append(f"{item.get('op')} {item.get('impl')} T={item.get('T')}: {item['error']}")
        if not rows:
            skipped.append(f"{path} skipped: no row with an op, T and ms")
            continue
        meta = data if isinstance(data, dict) else {}
        for check in meta.get("checks") or []:
            if isinstance(check, dict) and check.get("ok") is False:
                problems.append(f"correctness check failed: {check.get('name')} (error {check.get('error')}, "
                                f"bound {check.get('bound')})")
        card = str(meta.get("card") or path.stem.removeprefix("kernels-"))
        files.append(BenchFile(card, str(meta.get("device") or card), path, rows, problems))
    return files, skipped


def _row(raw: dict[str, Any]) -> dict[str, Any] | None:
    try:
        row = {"op": str(raw.get("op", raw.get("case", raw.get("name")))), "impl": str(raw.get("impl", "")),
               "T": int(raw["T"]), "ms": float(raw["ms"])}
    except (KeyError, TypeError, ValueError):
        return None
    row["ratios"] = {key.removeprefix("vs ").strip(): float(value) for key, value in raw.items()
                     if key.startswith("vs ") and isinstance(value, (int, float))}
    return row


def bench_tables(bench: BenchFile) -> list[Table]:
    """Per op: a row per implementation (median ms) and a row per speedup, a column per length."""
    tables = []
    for op in bench.ops():
        rows = [r for r in bench.rows if r["op"] == op]
        lengths = sorted({r["T"] for r in rows})
        table = Table(slug(f"kernels-{bench.card}-{op}"),
                      f"{op} on {bench.device}: median ms, and speedup (baseline time / time)",
                      ["Implementation", *(str(t) for t in lengths)])
        by_impl: dict[str, dict[int, dict[str, Any]]] = {}
        for r in rows:
            by_impl.setdefault(r["impl"], {})[r["T"]] = r
        for impl, cells in by_impl.items():
            table.rows.append([Cell(f"{impl} (ms)"), *(Cell(f"{cells[t]['ms']:.3f}", cells[t]["ms"]) if t in cells
                                                       else Cell(DASH) for t in lengths)])
        for impl, cells in by_impl.items():
            if impl in bench.baselines():
                continue
            baselines = list(dict.fromkeys(b for r in cells.values() for b in r["ratios"]))
            for base in baselines:
                values = {t: r["ratios"][base] for t, r in cells.items() if base in r["ratios"]}
                table.rows.append([Cell(f"{impl} vs {base}"), *(Cell(f"{values[t]:.2f}x", values[t]) if t in values
                                                                 else Cell(DASH) for t in lengths)])
        for problem in bench.problems:
            if problem.startswith(op) or problem.startswith("correctness"):
                table.note(problem)
        table.note(f"from {bench.path.name}")
        tables.append(table)
    return tables


PANELS = (("forward", "forward (prefill fwd)"), ("backward", "forward + backward"), ("decode", "decode"),
          (None, "other"))


def _direction(op: str) -> str | None:
    """Which of the paper's speed results an op compares with: forward, backward (fwd+bwd) or decode."""
    name = op.lower()
    if "decode" in name:
        return "decode"
    if "bwd" in name or "backward" in name:
        return "backward"
    if "fwd" in name or "forward" in name:
        return "forward"
    return None


def speedup_figure(bench: BenchFile, with_paper: bool) -> dict[str, bytes] | None:
    """Speedup against length: a panel per direction (forward, forward+backward, decode), a line per op and
    pair of implementations; the paper's Figure 6 and Table 4 as dashed lines when asked."""
    panels = {direction: figures.SpeedPanel(title, {}) for direction, title in PANELS}
    for row in bench.rows:
        if row["impl"] in bench.baselines():
            continue
        for base, value in row["ratios"].items():
            panels[_direction(row["op"])].ours.setdefault(f"{row['op']}: {row['impl']} vs {base}", {})[row["T"]] = value
    if with_paper:
        for direction, points in reference.kernel_speedups().items():
            panels[direction].dashed[f"paper: NSA vs FlashAttention-2 {direction} (A100, Fig. 6)"] = points
        panels["decode"].dashed["paper: NSA vs full attention, expected (Table 4)"] = reference.decode_speedups()
    shown = [panel for panel in panels.values() if panel.ours]
    if not shown:
        return None
    return figures.speed_panels(f"Kernel speedup on {bench.device}", shown, "speedup (x)")


def paper_speed_table() -> Table:
    """The paper's Figure 6 and Table 4 numbers, for reports asked for the reference."""
    kernel = reference.kernel_speedups()
    decode = reference.decode_speedups()
    lengths = sorted({*decode, *(t for points in kernel.values() for t in points)})
    table = Table("paper-speed", "NSA paper: NSA speedup over full attention (Figure 6 on A100; Table 4 expected decode)",
                  ["Quantity", *map(str, lengths)])
    for label, points in (("forward (kernel)", kernel["forward"]), ("backward (kernel)", kernel["backward"]),
                          ("decode (expected from memory access)", decode)):
        table.rows.append([Cell(label), *(Cell(f"{points[t]:.1f}x", points[t]) if t in points else Cell(DASH)
                                          for t in lengths)])
    return table
