"""Paired bootstrap: is one model's score on the same samples different from another's?

Two runs of one task score the same samples (matched by sample id). The difference of their means is
estimated from the per-sample differences, and its 95% interval by resampling those differences with
replacement (percentile bootstrap, as in Koehn 2004 and Dror et al. 2018 for NLP evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

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
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // len(diffs))  # keep the index matrix under ~32 MB
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        picks = rng.integers(0, len(diffs), size=(stop - start, len(diffs)))
        means[start:stop] = diffs[picks].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDelta(delta, float(low), float(high), len(diffs), confidence)
