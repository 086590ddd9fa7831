"""Reports from run directories: tables (Markdown, LaTeX, CSV), figures (PNG), one HTML file, and publishing.

runs.py reads run directories; tables.py builds every table (and the paired comparisons) and renders
Markdown, LaTeX and CSV; figures.py draws the PNGs; speed.py reads kernel bench files; html.py renders the
HTML report; build.py puts a report folder together and publishes it; commands.py is the CLI.
"""

from nsa_eval.report.build import build_report, publish

__all__ = ["build_report", "publish"]
