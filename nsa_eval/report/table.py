"""The table model and its renderings: `Table` (rows of `Cell`s with numbered notes), the report's parts (`Section`,
`Details`, `FigureFile`), the cell formatters, and Markdown, LaTeX and CSV (a DataFrame); html.py renders HTML.

A cell's note marks print as "[1]" after its text. Scores are printed as stored (0..1 fractions, 3 decimals), every cell
with its n; in the `paper` style, cells hold the number only, headers are short, and a note gives the n of each column.
A cell also carries its numbers (mean, stderr, n; a delta's interval), which the CSV files hold as numeric columns.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from nsa_eval.report.effective import BELOW, PASS

DASH = "\u2014"


@dataclass(frozen=True)
class Drill:
    """Where a cell's samples are: run index, task, and the breakdown values they must have."""

    run: int
    task: str
    filters: tuple[tuple[str, str], ...] = ()


@dataclass
class Cell:
    text: str
    sort: float | None = None  # numeric sort key for HTML tables (None: sort by text)
    drill: Drill | None = None
    notes: tuple[int, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)  # {"mean", "stderr", "n"} or {"delta", "low", "high", "n"}

    @property
    def plain(self) -> str:
        """The text with its note marks, as Markdown, LaTeX and CSV print it."""
        return self.text + "".join(f"[{n}]" for n in self.notes)


@dataclass
class Table:
    slug: str  # file and anchor name
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paper: bool = False  # the paper style: no n in cells (a note gives them), short headers

    def note(self, text: str) -> int:
        """The 1-based number of a note, adding it the first time it is used."""
        if text not in self.notes:
            self.notes.append(text)
        return self.notes.index(text) + 1

    def n_text(self, n: int | None) -> str:
        """" (n=12)" after a cell's number, or nothing in the paper style."""
        return "" if self.paper or n is None else f" (n={n})"

    def note_ns(self) -> None:
        """The paper style's note with the n of each column (a range where its cells differ)."""
        if not self.paper:
            return
        parts = []
        for index, column in enumerate(self.columns):
            ns = sorted({int(row[index].numbers["n"]) for row in self.rows
                         if index < len(row) and "n" in row[index].numbers})
            if ns:
                parts.append(f"{column} {ns[0]}" if len(ns) == 1 else f"{column} {ns[0]}-{ns[-1]}")
        if parts:
            self.note("n (samples per cell): " + "; ".join(parts))


# A report's parts, as build.py assembles them and html.py renders them.


@dataclass
class FigureFile:
    slug: str
    title: str
    files: dict[str, bytes]  # format -> bytes: png, svg, pdf
    wide: bool = False  # HTML: a full-width figure (several panels) rather than one of a pair

    @property
    def png(self) -> bytes:
        return self.files["png"]

    @property
    def base64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


@dataclass
class Details:
    title: str
    tables: list[Table]


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureFile] = field(default_factory=list)
    details: list[Details] = field(default_factory=list)  # HTML only (folded): per-run grids for drill-down
    notes: list[str] = field(default_factory=list)  # lines about the section as a whole (e.g. a skipped file)


# ---------------------------------------------------------------------------------------------- cell text


def fmt(value: float) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:.3f}"


def budget_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# ---------------------------------------------------------------------------------------------- rendering


PRIMARY = ("mean", "delta", "value")  # the number a cell shows; its other numbers get columns of their own


def _cell_numbers(cell: Cell) -> dict[str, float]:
    if cell.numbers:
        return cell.numbers
    return {"value": cell.sort} if cell.sort is not None else {}


def to_frame(table: Table) -> pd.DataFrame:
    """The table for CSV, with numbers as numbers: a column of text cells stays text (with note marks); a column of
    numbers gives its shown number (mean, delta or value) under the column's name, then one column per other number
    ("<column> stderr", "<column> n", "<column> low", ...). A cell without a number (a dash) is empty there."""
    data: dict[str, list[Any]] = {}
    for index, column in enumerate(table.columns):
        cells = [row[index] for row in table.rows]
        numbered = [_cell_numbers(cell) for cell in cells]
        texts_only = [cell for cell, numbers in zip(cells, numbered) if not numbers and cell.text not in (DASH, "n/a", "")]
        if not any(numbered) or texts_only:
            data[column] = [cell.plain for cell in cells]
            continue
        extra = list(dict.fromkeys(k for numbers in numbered for k in numbers if k not in PRIMARY))
        data[column] = [next((numbers[k] for k in PRIMARY if k in numbers), None) for numbers in numbered]
        for key in extra:
            data[f"{column} {key}"] = [numbers.get(key) for numbers in numbered]
    frame = pd.DataFrame(data)
    for name in frame.columns:
        if name.endswith(" n"):
            frame[name] = frame[name].astype("Int64")
    return frame


def to_markdown(table: Table) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    numeric = [any(row[i].sort is not None for row in table.rows) for i in range(len(table.columns))]
    lines = [f"### {table.title}", "", "| " + " | ".join(esc(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if right else ":---" for right in numeric) + "|"]
    lines += ["| " + " | ".join(esc(cell.plain) for cell in row) + " |" for row in table.rows]
    if table.notes:
        lines.append("")
        lines += [f"[{n}] {esc(text)}  " for n, text in enumerate(table.notes, 1)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "\u00b1": r"$\pm$", "\u0394": r"$\Delta$", "\u2212": "-", DASH: "---", "\u2265": r"$\geq$",
                  PASS: r"$\surd$", BELOW: r"$\times$"}
LATEX_PATTERN = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    return LATEX_PATTERN.sub(lambda m: _LATEX_SPECIAL[m.group()], text)


def _latex_mark(number: int) -> str:
    """A note mark; never a bare "[n]", which LaTeX would read as the optional argument of a preceding \\\\."""
    return rf"\textsuperscript{{[{number}]}}"


def to_latex(table: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); notes follow the tabular in small type."""
    alignment = "l" * min(2, len(table.columns)) if table.columns[:2] == ["Task", "Metric"] else "l"
    alignment += "r" * (len(table.columns) - len(alignment))
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{table.slug}}}", rf"\begin{{tabular}}{{{alignment}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(cell.text) + "".join(map(_latex_mark, cell.notes)) for cell in row) + r" \\"
              for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\footnotesize")
        lines += [rf"{_latex_mark(n)} {latex_escape(text)}\\" for n, text in enumerate(table.notes, 1)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
