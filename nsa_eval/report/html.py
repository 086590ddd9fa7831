"""The self-contained HTML report: one file, figures as data URIs, inline CSS and JS pinned by a
Content-Security-Policy hash, and every string from a run autoescaped by jinja2 (a response holding
<script> shows as text)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup

import nsa_eval
from nsa_eval.report.table import Drill, Section, Table

if TYPE_CHECKING:
    from nsa_eval.report.runs import Run

MAX_TEXT_CHARS = 4000  # longer responses and answers are cut in the drill-down, with a note of how much


def _clip(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return f"{text[:MAX_TEXT_CHARS]}\n[... {len(text) - MAX_TEXT_CHARS} more characters]"


def panel_id(run: int, task: str) -> str:
    return f"samples-{run}-{''.join(c if c.isalnum() else '-' for c in task)}"


def _response(record: dict[str, Any]) -> str:
    if "responses" in record:
        texts = [str(t) for t in record["responses"]]
        return texts[0] if len(texts) == 1 else "\n".join(f"[{i + 1}] {t}" for i, t in enumerate(texts))
    if "loglikelihoods" in record:
        pairs = record["loglikelihoods"]
        best = max(range(len(pairs)), key=lambda i: pairs[i][0]) if pairs else None
        return "\n".join(f"choice {i}: logprob {lp:.3f}{' greedy' if greedy else ''}{'  <- picked' if i == best else ''}"
                         for i, (lp, greedy) in enumerate(pairs))
    return ""


def _sample_row(record: dict[str, Any]) -> dict[str, str]:
    breakdown = record.get("breakdown") or {}
    target = record.get("target")
    tokens = [f"prompt {record['prompt_tokens']}" if "prompt_tokens" in record else "",
              f"new {sum(record['new_tokens'])}" if record.get("new_tokens") else "",
              "truncated" if record.get("truncated") else ""]
    return {
        "id": str(record["id"]),
        # values as str(), exactly as metrics.json's breakdown keys print them, for the drill-down filter
        "filters": json.dumps({k: str(v) for k, v in breakdown.items()}, ensure_ascii=False),
        "breakdown": ", ".join(f"{k}={v}" for k, v in breakdown.items()),
        "prompt": _clip(str(record.get("prompt_excerpt", ""))),
        "response": _clip(_response(record)),
        "target": _clip(target if isinstance(target, str) else json.dumps(target, ensure_ascii=False)),
        "scores": ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                            for k, v in (record.get("scores") or {}).items()),
        "tokens": ", ".join(t for t in tokens if t),
        # what the task adds per sample (HumanEval: each completion's outcome; LongBench: prompt cut)
        "details": _clip(json.dumps(record["details"], ensure_ascii=False, indent=1)) if record.get("details") else "",
    }


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def render(title: str, runs: list[Run], runs_table: Table, sections: list[Section]) -> str:
    """The report as one HTML document."""
    templates = resources.files("nsa_eval.report").joinpath("templates")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             loader=jinja2.FunctionLoader(lambda name: templates.joinpath(name).read_text("utf-8")))

    def drill(target: Drill) -> dict[str, str]:
        filters = dict(target.filters)
        where = ", ".join(f"{k}={v}" for k, v in filters.items())
        return {"panel": panel_id(target.run, target.task), "filters": json.dumps(filters, ensure_ascii=False),
                "caption": where or "all samples"}

    panels = [{"id": panel_id(index, task), "label": run.label, "task": task,
               "samples": [_sample_row(record) for record in run.samples(task)]}
              for index, run in enumerate(runs) for task in run.results]
    script = templates.joinpath("report.js").read_text("utf-8")
    style = templates.joinpath("report.css").read_text("utf-8")
    return env.get_template("report.html.j2").render(
        title=title,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=nsa_eval.__version__,
        runs_table=runs_table,
        sections=sections,
        panels=panels,
        drill=drill,
        script=Markup(script),
        style=Markup(style),
        script_hash=_csp_hash(script),
        style_hash=_csp_hash(style),
    )
