"""Effective length: the longest evaluated context length at which a model's score is at least a threshold, per model
and task family (NIAH, RULER), as RULER and NoLiMa report it, with a bootstrap interval deciding "at least".

Thresholds, on RULER's 0-100 scale (our niah and ruler tasks score each sample 0..1; the per-length score is taken in
percent before it is compared):
- RULER's: 85.6, Llama-2-7B's RULER average at 4K (RULER's README);
- NoLiMa's: 0.85 x the model's own score at its shortest evaluated length (NoLiMa's "base score" comes from its short
  contexts, 250 to 1K tokens).

A length's score: NIAH's, the mean over the length's samples (the `length` breakdown); RULER's, the mean over RULER's
tasks of each task's mean at that length (RULER's README table).

The rule. A length passes when the whole 95% percentile bootstrap interval of (score - threshold) lies at or above 0:
the score is at least the threshold beyond its sampling noise (one-sided, 97.5%). The interval resamples the length's
samples (RULER's within each task); NoLiMa's threshold is itself a score, so its interval resamples the shortest
length's samples too, independently (different prompts: nothing to pair by id). A length whose interval holds 0, or
that has no interval (fewer than 2 samples, per task for RULER), does not pass. The effective length is the longest
evaluated length L such that every evaluated length up to L passes (RULER's reading: effective up to the first length
that fails); when none passes it is shorter than the shortest length evaluated, when all pass it is at least the
longest. With RULER's own sample counts (hundreds per task and length) the interval is about a point wide and the rule
rarely differs from RULER's point-estimate rule (score above the threshold); where it does, the table says what the
point estimates alone would give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nsa_eval.report.runs import Run
from nsa_eval.stats import Margin, stratified_means, threshold_margin
from nsa_eval.tasks.base import is_number
from nsa_eval.tasks.ruler_data import SUBTASKS as RULER_TASKS

RULER_THRESHOLD = 85.6  # RULER's threshold: Llama-2-7B's score at 4K (its README), on its 0-100 scale
NOLIMA_RATIO = 0.85  # NoLiMa's threshold: 0.85 x the model's short-context (base) score
CONFIDENCE = 0.95
PASS, BELOW, UNSURE = "\u2713", "\u2717", "?"


@dataclass(frozen=True)
class Family:
    """A task family with an effective length: how a length's score is made from the samples."""

    name: str  # "NIAH", "RULER"
    stratum: str | None  # the breakdown key a length's score averages over (RULER: its tasks); None: samples pooled


NIAH = Family("NIAH", None)
RULER = Family("RULER", "task")


def family_of(task: str) -> Family | None:
    """The family of a task name (niah, ruler), or None for a task without an effective length."""
    if task == "niah" or task.startswith("niah"):
        return NIAH
    if task == "ruler" or task.startswith("ruler"):
        return RULER
    return None


@dataclass(frozen=True)
class Check:
    """One length against one threshold: its score (percent), the samples behind it and the margin's interval."""

    length: int
    score: float
    n: int
    margin: Margin

    @property
    def mark(self) -> str:
        return PASS if self.margin.passes else BELOW if self.margin.below else UNSURE


@dataclass
class Effective:
    """A run's effective length on one task under one threshold. threshold: in percent (None with a reason: there is
    none); checks: one per evaluated length, shortest first."""

    rule: str  # "RULER" or "NoLiMa"
    threshold: float | None
    checks: list[Check]
    reason: str | None = None
    base: Check | None = None  # NoLiMa: the shortest length, whose score the threshold scales
    notes: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [check.length for check in self.checks]

    def _longest(self, passes) -> int | None:
        longest = None
        for check in self.checks:
            if not passes(check):
                break
            longest = check.length
        return longest

    @property
    def length(self) -> int | None:
        """The longest length L with every evaluated length up to L passing (None: the shortest does not pass)."""
        return None if self.reason else self._longest(lambda check: check.margin.passes)

    @property
    def point_length(self) -> int | None:
        """The same by the point estimates alone (score above the threshold, RULER's own rule)."""
        return None if self.reason else self._longest(lambda check: check.margin.margin > 0)

    @property
    def all_pass(self) -> bool:
        return bool(self.checks) and self.length == self.checks[-1].length

    def text(self, label=None) -> str:
        """"1K", "\u22652K" (every length passes; 2K the longest evaluated), "<512" (the shortest fails), or a dash."""
        label = label or length_label
        if self.reason or not self.checks:
            return "\u2014"
        if self.length is None:
            return f"<{label(self.checks[0].length)}"
        return f"\u2265{label(self.length)}" if self.all_pass else label(self.length)

    def explanation(self, label=None) -> str | None:
        """What a "<X" or "\u2265X" says, for a note (None for a plain length)."""
        label = label or length_label
        if self.reason or not self.checks:
            return self.reason
        if self.all_pass:
            return (f"\u2265{label(self.checks[-1].length)}: at least the threshold at every evaluated length; "
                    f"{label(self.checks[-1].length)} is the longest evaluated, so the effective length may be longer")
        if self.length is None:
            later = [label(c.length) for c in self.checks[1:] if c.margin.passes]
            if not later:
                return f"<{label(self.checks[0].length)}: below the threshold at every evaluated length"
            return (f"<{label(self.checks[0].length)}: the shortest evaluated length does not pass ("
                    f"{', '.join(later)} {'passes' if len(later) == 1 else 'pass'} after it)")
        return None

    def point_note(self, label=None) -> str | None:
        """A note when the point estimates alone (RULER's own rule) would give another effective length."""
        label = label or length_label
        if self.reason or not self.checks or self.point_length == self.length:
            return None
        point = self.point_length
        if point is None:
            text = f"<{label(self.checks[0].length)}"
        else:
            text = (f"\u2265{label(point)}" if point == self.checks[-1].length else label(point))
        return (f"by the point estimates alone (score above the threshold, as RULER and NoLiMa decide) the effective length "
                f"would be {text}; the interval does not support it")


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _per_length(records: list[dict[str, Any]], headline: str, stratum: str | None) -> dict[int, dict[str, list[float]]]:
    """length -> stratum value -> the samples' scores in percent (one stratum "" when pooled)."""
    out: dict[int, dict[str, list[float]]] = {}
    for record in records:
        breakdown = record.get("breakdown") or {}
        length, score = breakdown.get("length"), (record.get("scores") or {}).get(headline)
        if length is None or not is_number(str(length)) or not isinstance(score, (int, float)):
            continue
        group = str(breakdown.get(stratum, "")) if stratum else ""
        out.setdefault(int(float(length)), {}).setdefault(group, []).append(100.0 * float(score))
    return out


def effective_lengths(run: Run, task: str, *, seed: int = 0, resamples: int = 2000) -> list[Effective] | None:
    """The run's effective lengths on a task of a known family, RULER's threshold first, then NoLiMa's; None when
    the task has no family or no per-sample scores by length."""
    family = family_of(task)
    result = run.results.get(task)
    if family is None or result is None:
        return None
    by_length = _per_length(run.samples(task), result.headline, family.stratum)
    if not by_length:
        return None
    lengths = sorted(by_length)
    scores, draws, counts = {}, {}, {}
    for length in lengths:
        strata = [by_length[length][key] for key in sorted(by_length[length])]
        scores[length] = float(np.mean([np.mean(values) for values in strata]))
        draws[length] = stratified_means(strata, resamples=resamples, seed=[seed, length])
        counts[length] = sum(len(values) for values in strata)

    ruler = Effective("RULER", RULER_THRESHOLD, [
        Check(length, scores[length], counts[length],
              threshold_margin(scores[length], draws[length], RULER_THRESHOLD, confidence=CONFIDENCE))
        for length in lengths])
    if family is RULER:
        covered = sorted({key for groups in by_length.values() for key in groups})
        if len(covered) < len(RULER_TASKS):
            ruler.reason = (f"RULER's threshold ({RULER_THRESHOLD}) is a {len(RULER_TASKS)}-task average; this run "
                            f"holds {len(covered)} of RULER's tasks, so it has none")

    shortest = lengths[0]
    base_score, base_draws = scores[shortest], draws[shortest]
    threshold = NOLIMA_RATIO * base_score
    checks = []
    for length in lengths:
        both = draws[length] is not None and base_draws is not None
        checks.append(Check(length, scores[length], counts[length], threshold_margin(
            scores[length], draws[length] if both else None, threshold,
            NOLIMA_RATIO * base_draws if both else None, confidence=CONFIDENCE)))
    nolima = Effective("NoLiMa", threshold, checks, base=checks[0])
    if base_score == 0:
        nolima.reason = (f"the shortest length ({length_label(shortest)}) scores 0, so NoLiMa's threshold "
                         f"({NOLIMA_RATIO} x 0) says nothing")
    for effective in (ruler, nolima):
        if any(math.isnan(check.margin.low) for check in effective.checks):
            per = " per task" if family.stratum else ""
            effective.notes.append(f"?: no interval where a length has fewer than 2 samples{per}; such a length "
                                   "does not pass")
    return [ruler, nolima]
