"""Report figures, each as PNG, SVG and PDF bytes ({"png": ..., "svg": ..., "pdf": ...}; matplotlib's object API,
no global pyplot state). PNG at 200 dpi for the web, SVG and PDF for papers and blog posts.

- `breakdown_heatmap`: a task's two-key breakdown for one run (NIAH: depth x context length, the paper's
  Figure 5; LongBench: subset x length bucket) on a fixed 0..1 colour scale, the mean per column drawn over it;
- `difference_map`: the same grid, one run minus another, on a fixed -1..1 scale;
- `score_by_key`: the headline score against a breakdown key (context length), one line per run;
- `speed_panels`: speedup against sequence length in side-by-side panels (the paper's Figure 6);
- `budget_curve`: score against sparse budget (a budget sweep), a line per series, full attention dashed;
- `matrix_panels`: side-by-side 0..1 heatmaps of one row x column grid each (`nsa-eval inspect`: selection recall and
  dense mass share, layer x KV head and layer x query position).
- `cost_pareto`: score against decode ms per token and against KV bytes per step, a colour per length, a marker per
  run, each length's Pareto front joined.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from nsa_eval.report.runs import Run, value_order
from nsa_eval.tasks.base import is_number


def _order(values: set[str]) -> list[str]:
    return sorted(values, key=value_order)

def _axis_label(key: str, values: list[str]) -> str:
    """NIAH's numeric lengths are tokens; LongBench's length buckets ("0-4k") count words, so say only "bucket"."""
    if key == "length":
        return "context length (tokens)" if all(is_number(v) for v in values) else "length bucket"
    return {"depth": "needle depth (% of the context)",
            "position": "position in the window (tokens; a bin's first position)"}.get(key, key)
SCORE_COLOURS = "RdYlGn"
DIFFERENCE_COLOURS = "RdBu"


FORMATS = ("png", "svg", "pdf")
PNG_DPI = 200


def _render(figure: Figure) -> dict[str, bytes]:
    """The figure in every format of FORMATS."""
    files = {}
    for kind in FORMATS:
        buffer = io.BytesIO()
        stamp = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(kind)  # the same bytes for the same figure
        figure.savefig(buffer, format=kind, dpi=PNG_DPI if kind == "png" else None, bbox_inches="tight", metadata=stamp)
        files[kind] = buffer.getvalue()
    return files


def _grid(run: Run, task: str, cross_key: str) -> tuple[list[str], list[str], np.ndarray]:
    """(column values, row values, means[row, column] with nan where no sample) of a cross breakdown."""
    result = run.results[task]
    cells = result.breakdowns[cross_key]
    columns = _order({key.split("|")[0] for key in cells})
    rows = _order({key.split("|")[1] for key in cells})
    grid = np.full((len(rows), len(columns)), np.nan)
    for key, by_metric in cells.items():
        column, row = key.split("|")
        if result.headline in by_metric:
            grid[rows.index(row), columns.index(column)] = by_metric[result.headline]["mean"]
    return columns, rows, grid


def _draw_grid(axes, columns: list[str], rows: list[str], grid: np.ndarray, cross_key: str,
               colours: str, limits: tuple[float, float], signed: bool):
    first, second = cross_key.split(" x ")
    return _draw_matrix(axes, columns, rows, grid, colours, limits, signed, _axis_label(first, columns),
                        _axis_label(second, rows))


def _draw_matrix(axes, columns: list[str], rows: list[str], grid: np.ndarray, colours: str,
                 limits: tuple[float, float], signed: bool, xlabel: str, ylabel: str):
    """grid[row, column] as coloured cells (grey where nan), each value written in its cell up to 200 cells."""
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=limits[0], vmax=limits[1], aspect="auto")
    axes.set_facecolor("#d9d9d9")  # cells without samples
    axes.set_xticks(range(len(columns)), columns, rotation=45 if len(columns) > 8 else 0)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if grid.size <= 200:
        for (r, c), value in np.ndenumerate(grid):
            if not math.isnan(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                axes.text(c, r, f"{value:+.2f}" if signed else f"{value:.2f}", ha="center", va="center",
                          fontsize=8, color="white" if dark else "black")
    return image


def _figure_size(columns: list[str], rows: list[str]) -> tuple[float, float]:
    return max(6.0, 0.75 * len(columns) + 3), max(3.5, 0.45 * len(rows) + 2)


def breakdown_heatmap(run: Run, task: str, cross_key: str) -> dict[str, bytes]:
    """Heatmap of run's cross breakdown of a task (headline metric, fixed 0..1 scale), with the mean per
    column (NIAH: per context length) as a line in a strip over it."""
    result = run.results[task]
    columns, rows, grid = _grid(run, task, cross_key)
    width, height = _figure_size(columns, rows)
    figure = Figure(figsize=(width, height + 1.2), layout="constrained")
    mean_axes, axes = figure.subplots(2, 1, sharex=True, height_ratios=[1, 3.5])
    image = _draw_grid(axes, columns, rows, grid, cross_key, SCORE_COLOURS, (0.0, 1.0), signed=False)
    first = cross_key.split(" x ")[0]
    per_column = result.breakdowns.get(first, {})
    means = [per_column.get(c, {}).get(result.headline, {}).get("mean", math.nan) for c in columns]
    mean_axes.plot(range(len(columns)), means, color="black", marker="o", markerfacecolor="white")
    for x, mean in enumerate(means):
        if not math.isnan(mean):
            mean_axes.annotate(f"{mean:.2f}", (x, mean), textcoords="offset points", xytext=(0, 6), ha="center",
                               fontsize=8)
    mean_axes.set_ylim(0, 1.3)
    mean_axes.set_yticks([0, 0.5, 1])
    mean_axes.set_ylabel(f"mean per\n{first}", fontsize=8)
    mean_axes.grid(alpha=0.3)
    mean_axes.tick_params(labelbottom=False)
    figure.colorbar(image, ax=[mean_axes, axes], label=result.headline)
    mean_axes.set_title(f"{run.label}\n{task} {result.headline} {result.score:.3f} (n={result.n})")
    return _render(figure)


def difference_map(run: Run, base: Run, task: str, cross_key: str) -> dict[str, bytes]:
    """run minus base on a task's cross breakdown (headline metric), -1..1, blue where run scores higher."""
    columns, rows, grid = _grid(run, task, cross_key)
    base_columns, base_rows, base_grid = _grid(base, task, cross_key)
    aligned = np.full_like(grid, np.nan)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            if row in base_rows and column in base_columns:
                aligned[r, c] = base_grid[base_rows.index(row), base_columns.index(column)]
    difference = grid - aligned
    figure = Figure(figsize=_figure_size(columns, rows), layout="constrained")
    axes = figure.add_subplot()
    image = _draw_grid(axes, columns, rows, difference, cross_key, DIFFERENCE_COLOURS, (-1.0, 1.0), signed=True)
    headline = run.results[task].headline
    figure.colorbar(image, ax=axes, label=f"\u0394 {headline}")
    overall = run.results[task].score - base.results[task].score
    axes.set_title(f"{run.label} \u2212 {base.label}\n{task} {headline} (overall {overall:+.3f})")
    return _render(figure)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def score_by_key(runs: list[Run], task: str, key: str, apart: dict[str, str] | None = None) -> dict[str, bytes]:
    """Headline score (mean, stderr bars) against a breakdown key, one line per run that has it. Each run has its
    own marker and line style and sits slightly apart along x, so runs with equal scores do not hide each other.
    apart: run key -> why that run is not comparable with the others, printed in its legend entry."""
    values = _order({v for run in runs if task in run.results for v in run.results[task].breakdowns.get(key, {})})
    numeric = all(is_number(v) for v in values)
    log_x = numeric and values and float(values[0]) > 0 and float(values[-1]) / float(values[0]) >= 4
    drawn = [run for run in runs if task in run.results and key in run.results[task].breakdowns]
    figure = Figure(figsize=(7.0, 4.0))
    axes = figure.add_subplot()
    headline, fractions = "", True
    span = (float(values[-1]) - float(values[0])) if numeric and len(values) > 1 else 1.0
    for number, run in enumerate(drawn):
        result = run.results[task]
        headline = result.headline
        cells = result.breakdowns[key]
        present = [v for v in values if result.headline in cells.get(v, {})]
        shift = (number - (len(drawn) - 1) / 2) * (0.035 if len(drawn) > 1 else 0)
        if numeric:
            xs = [float(v) * 2 ** shift if log_x else float(v) + shift * span * 0.3 for v in present]
        else:
            xs = [values.index(v) + shift * 2 for v in present]
        means = [cells[v][result.headline]["mean"] for v in present]
        errors = [cells[v][result.headline].get("stderr", 0.0) for v in present]
        fractions = fractions and all(0 <= m <= 1 for m in means)
        axes.errorbar(xs, means, yerr=errors, marker=MARKERS[number % len(MARKERS)], capsize=3, alpha=0.85,
                      linestyle=LINESTYLES[number % len(LINESTYLES)], markerfacecolor="none" if number % 2 else None,
                      label=run.label + (apart or {}).get(run.key, ""))
    if log_x:
        axes.set_xscale("log", base=2)
    if numeric:
        axes.set_xticks([float(v) for v in values], values)
        axes.minorticks_off()
    else:
        axes.set_xticks(range(len(values)), values)
    if fractions:  # scores (accuracy) on one fixed scale; other quantities (perplexity) on their own
        axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel(_axis_label(key, values))
    axes.set_ylabel(headline)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"{task}: {headline} by {key} (bars: standard error)")
    return _render(figure)


@dataclass
class SpeedPanel:
    """One panel of a speed figure: `ours` drawn solid, `dashed` (e.g. the paper's) dashed; {label: {T: value}}."""

    title: str
    ours: dict[str, dict[int, float]]
    dashed: dict[str, dict[int, float]] = field(default_factory=dict)


def speed_panels(title: str, panels: list[SpeedPanel], ylabel: str) -> dict[str, bytes]:
    """Side-by-side panels of speedup against sequence length (log2 axis) with a 1x guide, as the paper's Figure 6."""
    figure = Figure(figsize=(4.6 * len(panels), 4.4), layout="constrained")
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        lengths = sorted({t for points in [*panel.ours.values(), *panel.dashed.values()] for t in points})
        for label, points in panel.ours.items():
            ts = sorted(points)
            axes.plot(ts, [points[t] for t in ts], marker="o", label=label)
        for label, points in panel.dashed.items():
            ts = sorted(points)
            axes.plot(ts, [points[t] for t in ts], linestyle="--", marker="x", color="grey", label=label)
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xscale("log", base=2)
        axes.set_xticks(lengths, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in lengths])
        axes.minorticks_off()
        axes.set_xlabel("sequence length (tokens)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.set_title(panel.title, fontsize=10)
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    figure.suptitle(title)
    return _render(figure)


def budget_curve(title: str, series: dict[str, dict[int, dict[str, float]]], reference: dict[str, dict[str, float]],
                 ylabel: str) -> dict[str, bytes]:
    """Score (mean, stderr bars) against sparse budget on a log2 axis, a line per series ({label: {budget: {"mean",
    "stderr"}}}, e.g. all samples and each context length); a series' full-attention score (reference, same label) is a
    dashed line of the same colour across the plot."""
    figure = Figure(figsize=(7.0, 4.2))
    axes = figure.add_subplot()
    budgets = sorted({b for points in series.values() for b in points})
    colours = [axes._get_lines.get_next_color() for _ in series]  # noqa: SLF001 - matplotlib's colour cycle
    for number, (label, points) in enumerate(series.items()):
        xs = sorted(points)
        axes.errorbar(xs, [points[b]["mean"] for b in xs], yerr=[points[b].get("stderr") or 0.0 for b in xs],
                      marker=MARKERS[number % len(MARKERS)], capsize=3, color=colours[number], label=label,
                      linewidth=2.0 if number == 0 else 1.2)
        if label in reference:
            axes.axhline(reference[label]["mean"], color=colours[number], linestyle="--", linewidth=1.0,
                         label=f"{label}, full attention")
    axes.set_xscale("log", base=2)
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.minorticks_off()
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel("sparse budget (tokens each query attends)")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    order = {label: number for number, label in enumerate(series)}  # each series' line, then its full attention's
    ranked = sorted(zip(handles, labels), key=lambda pair: (order.get(pair[1].removesuffix(", full attention"), 0),
                                                            pair[1].endswith(", full attention")))
    axes.legend([h for h, _ in ranked], [label for _, label in ranked], fontsize=7, loc="center left",
                bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes.set_title(f"{title} (bars: standard error)", fontsize=10)
    figure.set_layout_engine("constrained")
    return _render(figure)


def matrix_panels(title: str, panels: dict[str, np.ndarray], columns: list[str], rows: list[str], xlabel: str,
                  ylabel: str) -> dict[str, bytes]:
    """Heatmaps side by side on one fixed 0..1 scale, one per {name: grid[row, column]} (nan: grey), each value in
    its cell up to 200 cells; rows top to bottom as given."""
    width, height = _figure_size(columns, rows)
    figure = Figure(figsize=(width * len(panels) * 0.8, height), layout="constrained")
    image = None
    for axes, (name, grid) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        image = _draw_matrix(axes, columns, rows, grid, SCORE_COLOURS, (0.0, 1.0), False, xlabel, ylabel)
        axes.set_title(name, fontsize=10)
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="fraction (0..1)")
    figure.suptitle(title, fontsize=10)
    return _render(figure)


@dataclass
class ParetoPoint:
    """One run at one length: its score (stderr) and its costs (None where the run did not record one)."""

    label: str  # the run
    group: str  # the length ("length 2048", or "all samples")
    score: float
    stderr: float | None
    decode_ms_per_token: float | None
    kv_bytes_per_step: float | None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indexes of the (cost, score) points no other point beats (cost no higher and score no lower, one of them
    strictly), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def cost_pareto(title: str, points: list[ParetoPoint], ylabel: str) -> dict[str, bytes]:
    """Two panels: score against decode ms per token, and against KV MB read per decode step (log axes where the
    costs span 4x or more); a colour per length, a marker per run (filled on its length's Pareto front, which a
    dashed line joins: no other run is both cheaper and better there), standard error bars."""
    figure = Figure(figsize=(11.0, 4.4), layout="constrained")
    groups = list(dict.fromkeys(p.group for p in points))
    labels = list(dict.fromkeys(p.label for p in points))
    panels = (("decode_ms_per_token", "decode ms per token (lower is faster)", 1.0),
              ("kv_bytes_per_step", "KV MB read per decode step", 1e6))
    axes_list = figure.subplots(1, 2, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    fractions = all(0 <= p.score <= 1 for p in points)
    for axes, (field_name, xlabel, scale) in zip(axes_list, panels):
        drawn = [p for p in points if getattr(p, field_name) is not None]
        for g, group in enumerate(groups):
            mine = [p for p in drawn if p.group == group]
            if not mine:
                continue
            xy = [(getattr(p, field_name) / scale, p.score) for p in mine]
            front = pareto_front(xy)
            for i, p in enumerate(mine):
                number = labels.index(p.label)
                axes.errorbar(*xy[i], yerr=p.stderr or 0.0, marker=MARKERS[number % len(MARKERS)], color=colours[g],
                              markerfacecolor=colours[g] if i in front else "none", capsize=3, linestyle="none",
                              markersize=max(4, 10 - 2 * number))  # equal points: the later run's marker inside
            if len(front) > 1:
                axes.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color=colours[g], linestyle="--",
                          linewidth=1.0)
        xs = [getattr(p, field_name) / scale for p in drawn]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
            axes.set_xscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            axes.xaxis.set_major_formatter(plain)
            axes.xaxis.set_minor_formatter(plain)
        if not xs:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
    if fractions:
        axes_list[0].set_ylim(-0.05, 1.05)
    axes_list[0].set_ylabel(ylabel)
    handles = [axes_list[1].plot([], [], marker=MARKERS[i % len(MARKERS)], color="black", linestyle="none",
                                 label=label)[0] for i, label in enumerate(labels)]
    handles += [axes_list[1].plot([], [], marker="s", color=colours[g], linestyle="none", label=group)[0]
                for g, group in enumerate(groups)]
    axes_list[1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.suptitle(f"{title}\nfilled: on the length's Pareto front (dashed); bars: standard error", fontsize=10)
    return _render(figure)
