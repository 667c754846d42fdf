"""Evaluation statistics against hand-computed values, brute force, scipy and simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.algos.eval_stats import (
    bootstrap_ci,
    holm,
    is_binary,
    mcnemar_midp,
    paired_bootstrap_ci,
    paired_permutation_test,
    pass_at_k,
    ratio,
)


# ---------------------------------------------------------------- pass@k
def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong: every draw of k has a correct one
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("n,c", [(6, 2), (8, 3), (7, 0), (5, 5)])
def test_pass_at_k_is_the_expectation_over_all_draws(n, c):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        draws = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in d) for d in draws) / len(draws)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


# ------------------------------------------------------------- bootstrap
def test_ratio_weights_tokens():
    assert ratio([3.0, 1.0], [2.0, 2.0]) == 1.0  # summed NLL / summed tokens
    assert ratio([1, 0, 1, 1]) == 0.75


def test_bootstrap_ci_of_a_ratio_scales_with_its_weights():
    x = np.random.default_rng(0).normal(size=50)
    lo, hi = bootstrap_ci(x, seed=3)
    lo2, hi2 = bootstrap_ci(x, np.full(50, 2.0), seed=3)  # same resampled items, every w = 2
    assert (lo2, hi2) == pytest.approx((lo / 2, hi / 2))
    assert lo < x.mean() < hi


def test_paired_bootstrap_ci_resamples_the_same_items_for_both():
    x = np.random.default_rng(1).normal(size=40)
    assert paired_bootstrap_ci(x, np.zeros(40), seed=5) == pytest.approx(bootstrap_ci(x, seed=5))
    # a constant shift on every item: every resample's delta is exactly the shift
    assert paired_bootstrap_ci(x + 0.25, x, seed=5) == pytest.approx((0.25, 0.25))


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    x = np.random.default_rng(2).normal(1.0, 2.0, size=300)
    ours = bootstrap_ci(x, resamples=20000, seed=0)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20000, random_state=1).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.02)  # Monte Carlo noise of two resamplings


def test_bootstrap_ci_covers_the_true_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = 0
    for sim in range(200):
        x = rng.random(200) < 0.7
        lo, hi = bootstrap_ci(x, resamples=1000, seed=sim)
        hits += lo <= 0.7 <= hi
    assert 0.92 <= hits / 200 <= 0.98


# ---------------------------------------------------------- paired tests
def test_mcnemar_midp_hand_value_and_scipy():
    cand = [1, 1, 1, 1, 1, 0, 0, 1]
    base = [0, 0, 0, 0, 0, 0, 0, 1]  # 5 discordant, all for the candidate
    # 2 P(X < 0) + P(X = 0) for X ~ Bin(5, 1/2); the exact test's 2 P(X <= 0) would be 2/32
    assert mcnemar_midp(cand, base) == pytest.approx(1 / 32)
    rng = np.random.default_rng(3)
    a, b = rng.random(60) < 0.6, rng.random(60) < 0.45
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    exact = stats.binomtest(k, n, 0.5).pvalue  # mid-p = exact two-sided p - P(X = k)
    assert mcnemar_midp(a, b) == pytest.approx(exact - stats.binom.pmf(k, n, 0.5), rel=1e-9)
    assert mcnemar_midp([1, 0, 1, 0], [0, 1, 1, 0]) == 1.0  # one discordant item each way
    assert mcnemar_midp([1, 0, 1], [1, 0, 1]) == 1.0  # identical outcomes: no evidence at all


def test_permutation_test_equals_scipy_exact_enumeration():
    rng = np.random.default_rng(4)
    x = rng.normal(size=9)
    y = x + rng.normal(0.4, 0.5, size=9)
    ref = stats.permutation_test(
        (x, y), lambda a, b, axis: a.mean(axis) - b.mean(axis), permutation_type="samples", vectorized=True
    )
    assert paired_permutation_test(x, y) == pytest.approx(ref.pvalue, rel=1e-12)


def test_permutation_test_of_a_token_weighted_ratio_by_hand():
    xc, wc = [2.0, 6.0, 3.0], [1.0, 2.0, 3.0]  # per-item NLL sums and token counts
    xb, wb = [4.0, 9.0, 6.0], [1.0, 2.0, 3.0]
    observed = sum(xc) / sum(wc) - sum(xb) / sum(wb)
    null = []
    for flips in itertools.product([False, True], repeat=3):
        c = [(b, vb) if f else (a, va) for f, a, va, b, vb in zip(flips, xc, wc, xb, wb)]
        b = [(a, va) if f else (b, vb) for f, a, va, b, vb in zip(flips, xc, wc, xb, wb)]
        null.append(sum(v for v, _ in c) / sum(w for _, w in c) - sum(v for v, _ in b) / sum(w for _, w in b))
    want = min(1.0, 2 * min(sum(t >= observed for t in null), sum(t <= observed for t in null)) / 8)
    assert paired_permutation_test(xc, xb, wc, wb) == pytest.approx(want)
    assert want == pytest.approx(0.25)  # only the identity and the full swap are as extreme


def test_permutation_test_monte_carlo_agrees_with_scipy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=40)
    y = x + rng.normal(0.15, 1.0, size=40)
    ref = stats.permutation_test(
        (x, y),
        lambda a, b, axis: a.mean(axis) - b.mean(axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=20000,
        random_state=0,
    )
    assert paired_permutation_test(x, y, resamples=20000, seed=1) == pytest.approx(ref.pvalue, abs=0.015)


def _paired_outcomes(rng, n: int, acc_c: float, acc_b: float) -> tuple[np.ndarray, np.ndarray]:
    """Two models on the same items: a shared item difficulty u, model-specific noise; a
    model solves an item when u + noise < its accuracy (so accuracies are acc_c and acc_b)."""
    u = rng.random(n)
    return u + rng.normal(0, 0.1, n) < acc_c, u + rng.normal(0, 0.1, n) < acc_b


def test_mcnemar_false_positive_rate_and_power_over_simulated_model_pairs():
    rng = np.random.default_rng(11)
    # 1000 pairs (more than the 200 the bound was set for): the rate's standard error is 0.007
    false_pos = sum(mcnemar_midp(*_paired_outcomes(rng, 200, 0.5, 0.5)) < 0.05 for _ in range(1000))
    assert 0.02 <= false_pos / 1000 <= 0.08
    detected = sum(mcnemar_midp(*_paired_outcomes(rng, 200, 0.6, 0.5)) < 0.05 for _ in range(200))
    assert detected / 200 >= 0.9


def test_permutation_false_positive_rate_and_power_on_continuous_scores():
    rng = np.random.default_rng(12)

    def pair(shift: float):
        difficulty = rng.gamma(2.0, 1.0, 200)  # per-item NLL shared by both models
        return difficulty + rng.normal(0, 0.5, 200) - shift, difficulty + rng.normal(0, 0.5, 200)

    # 400 simulations: the rate's standard error (0.011) keeps [0.02, 0.08] at +-2.7 of them
    false_pos = sum(paired_permutation_test(*pair(0.0), resamples=1000, seed=s) < 0.05 for s in range(400))
    assert 0.02 <= false_pos / 400 <= 0.08
    # a shift of 0.2 nats is 0.28 standard deviations of the per-item difference
    detected = sum(paired_permutation_test(*pair(0.2), resamples=1000, seed=s) < 0.05 for s in range(200))
    assert detected / 200 >= 0.9


# ------------------------------------------------------------------ Holm
def test_holm_hand_values():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> made monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02]


def test_is_binary():
    assert is_binary([0, 1, 1.0], [0.0])
    assert not is_binary([0, 0.5])
    assert math.isclose(ratio([True, False]), 0.5)
