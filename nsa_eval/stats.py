"""Bootstrap intervals (percentile bootstrap, as in Koehn 2004 and Dror et al. 2018 for NLP evaluation).

Paired: is one model's score on the same samples different from another's? Two runs of one task score the same
samples (matched by sample id). The difference of their means is estimated from the per-sample differences, and its
95% interval by resampling those differences with replacement.

Stratified (`stratified_means`, `threshold_margin`): is a score at least a threshold? A score that is the mean of
several groups' means (RULER's score at a length: the mean over its tasks) is resampled within each group, so every
resample keeps the design; the margin over a threshold that is itself a score (NoLiMa's 0.85 x the short-context
score) resamples both scores, each from its own samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class PairedDelta:
    """candidate - baseline over the samples both scored.

    delta: mean of the per-sample differences (score units, e.g. accuracy in 0..1).
    low, high: the bootstrap interval of that mean (nan when fewer than 2 pairs).
    n: number of samples matched by id.
    """

    delta: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (a significant difference)."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDelta:
    """Paired bootstrap interval for mean(candidate[id] - baseline[id]) over the ids both hold.

    candidate, baseline: sample id -> score. Ids found in only one are ignored (n counts the pairs).
    Raises ValueError when no id is shared.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    ids = sorted(candidate.keys() & baseline.keys())
    if not ids:
        raise ValueError("the two runs share no sample id, so they cannot be paired")
    diffs = np.array([float(candidate[i]) - float(baseline[i]) for i in ids])
    delta = float(diffs.mean())
    if len(diffs) < 2:
        return PairedDelta(delta, math.nan, math.nan, len(diffs), confidence)
    means = resampled_means(diffs, resamples, np.random.default_rng(seed))
    low, high = percentile_interval(means, confidence)
    return PairedDelta(delta, low, high, len(diffs), confidence)


def resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The means of `resamples` resamples of values with replacement, drawn from rng."""
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // len(values))  # keep the index matrix under ~32 MB
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(axis=1)
    return means


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` share of the bootstrap draws (percentile interval)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def stratified_means(strata: Sequence[Sequence[float]], *, resamples: int = 2000,
                     seed: int | Sequence[int] = 0) -> np.ndarray | None:
    """Bootstrap draws of the mean of the strata's means: each stratum resampled with replacement within itself.

    One stratum is a plain bootstrap of its mean. None when a stratum holds fewer than 2 values (its resamples would
    all be the same value, an interval that claims a certainty one sample cannot give) or there is no stratum."""
    arrays = [np.asarray(values, dtype=float) for values in strata]
    if not arrays or any(len(values) < 2 for values in arrays):
        return None
    rng = np.random.default_rng(seed)
    return sum(resampled_means(values, resamples, rng) for values in arrays) / len(arrays)


@dataclass(frozen=True)
class Margin:
    """score - threshold, with the percentile bootstrap interval of that difference.

    low, high: nan when there is no interval (a stratum of fewer than 2 samples). passes: the whole interval is at or
    above zero (the score is at least the threshold beyond its sampling noise); below: the whole interval is under
    zero; neither: the interval holds zero, or there is none."""

    margin: float
    low: float
    high: float
    confidence: float

    @property
    def passes(self) -> bool:
        return self.low >= 0  # False for nan

    @property
    def below(self) -> bool:
        return self.high < 0  # False for nan


def threshold_margin(score: float, draws: np.ndarray | None, threshold: float,
                     threshold_draws: np.ndarray | None = None, *, confidence: float = 0.95) -> Margin:
    """The margin of a score over a threshold and its interval. draws: bootstrap draws of the score
    (`stratified_means`); threshold_draws: draws of the threshold when it is itself estimated (NoLiMa's ratio x a
    short-context score), else the threshold is a constant (RULER's 85.6). No draws: no interval (nan)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    margin = score - threshold
    if draws is None:
        return Margin(margin, math.nan, math.nan, confidence)
    differences = draws - (threshold if threshold_draws is None else threshold_draws)
    low, high = percentile_interval(differences, confidence)
    return Margin(margin, low, high, confidence)
