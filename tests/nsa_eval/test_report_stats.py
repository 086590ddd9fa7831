"""Paired bootstrap: intervals cover a known difference and exclude zero only when they should (seeded)."""

import numpy as np
import pytest

from nsa_eval.stats import paired_bootstrap


def paired_scores(rng: np.random.Generator, n: int, p_base: float, p_candidate: float, shared: float = 0.5):
    """Correlated 0/1 scores on n shared samples: P(base right) = p_base, P(candidate right) = p_candidate.

    The candidate reuses the base's uniform draw on a `shared` fraction of samples (a sample hard for one
    is hard for the other) and draws afresh on the rest; either way its draw is uniform, so the true mean
    difference is exactly p_candidate - p_base.
    """
    u = rng.random(n)
    v = np.where(rng.random(n) < shared, u, rng.random(n))
    ids = [f"s{i}" for i in range(n)]
    return dict(zip(ids, (v < p_candidate).astype(float))), dict(zip(ids, (u < p_base).astype(float)))


@pytest.mark.parametrize("true_delta", [0.0, 0.05])
def test_interval_covers_the_true_difference_about_95_percent_of_the_time(true_delta):
    rng = np.random.default_rng(1)
    trials, covered = 150, 0
    for trial in range(trials):
        candidate, base = paired_scores(rng, 300, 0.5, 0.5 + true_delta)
        result = paired_bootstrap(candidate, base, resamples=1000, seed=trial)
        covered += result.low <= true_delta <= result.high
    # binomial(150, 0.95): 5th..99.9th percentile is about 136..148; a broken interval lands far outside
    assert 0.88 <= covered / trials <= 0.995, covered


def test_excludes_zero_only_when_it_should():
    rng = np.random.default_rng(2)
    same = [paired_bootstrap(*paired_scores(rng, 300, 0.6, 0.6, shared=1.0), resamples=1000, seed=t).excludes_zero
            for t in range(50)]
    assert sum(same) == 0  # identical answers: every per-sample difference is 0
    # no true difference, but noise: about 5% false positives (binomial(100, 0.05) exceeds 12 with p < 0.001)
    noisy = [paired_bootstrap(*paired_scores(rng, 300, 0.5, 0.5), resamples=1000, seed=t).excludes_zero
             for t in range(100)]
    assert sum(noisy) <= 12
    better = [paired_bootstrap(*paired_scores(rng, 300, 0.5, 0.65), resamples=1000, seed=t) for t in range(50)]
    assert all(r.excludes_zero and r.low > 0 for r in better)


def test_pairs_by_id_not_by_order_and_ignores_unpaired_ids():
    candidate = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0, "extra": 0.0}
    base = {"d": 0.0, "c": 0.0, "b": 1.0, "a": 0.0, "other": 1.0}
    result = paired_bootstrap(candidate, base, seed=0)
    assert result.n == 4
    assert result.delta == pytest.approx(0.5)  # a: +1, b: 0, c: 0, d: +1
    assert result.low <= 0.5 <= result.high
    again = paired_bootstrap(dict(reversed(list(candidate.items()))), base, seed=0)
    assert (again.low, again.high) == (result.low, result.high)


def test_seeded_and_bad_input():
    rng = np.random.default_rng(3)
    candidate, base = paired_scores(rng, 200, 0.4, 0.5)
    assert paired_bootstrap(candidate, base, seed=7) == paired_bootstrap(candidate, base, seed=7)
    with pytest.raises(ValueError, match="share no sample id"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})
    single = paired_bootstrap({"a": 1.0}, {"a": 0.0})
    assert single.delta == 1.0 and not single.excludes_zero  # one pair gives no interval
