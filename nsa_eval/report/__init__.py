"""Reports from run directories: tables (Markdown, LaTeX, CSV), figures (PNG), one HTML file, and publishing.

runs.py reads run directories (a budget sweep's folder as its runs); table.py holds the table model (Table, Cell, a
report's sections) and renders Markdown, LaTeX and CSV; comparisons.py joins runs by task and pairs them against the
baseline; score_tables.py builds the tables of any task (by model, by task, by breakdown key); benchmark_tables.py
builds a benchmark's own tables (RULER's, AIME's, the effective length) from its registry; effective.py computes
effective lengths (NIAH, RULER); sweeps.py finds budget sweeps among the runs and builds their section; cost.py puts
each run's speed and KV cost beside its score per length (speedups against the baseline on one card, the Pareto figure)
and holds the Speed table; figures.py draws the PNGs; speed.py reads kernel bench files; html.py renders the HTML
report; build.py puts a report folder together and publishes it (`build_report`, `publish`); commands.py is the CLI.
Importing this package is cheap: matplotlib and pandas load with build.py.
"""

from pathlib import Path

FORMATS = ("md", "html", "latex", "csv")
RESULTS_DIR = Path("results")  # published result sets, committed
RUNS_ROOT = RESULTS_DIR / "runs"  # run directories (ignored by git)
