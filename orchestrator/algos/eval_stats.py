"""Statistics of candidate-vs-base evaluation: pass@k, bootstrap intervals, paired tests, Holm.

Every metric is a ratio over items, `sum(x) / sum(w)`: an accuracy or a pass@k is a mean
(`w = 1`), a per-token NLL is summed NLL over summed tokens (`x` the item's NLL, `w` its
token count), so long items weigh by their tokens as in a perplexity over the whole set.
Resampling always draws items, never tokens or samples: items are the independent units.

* pass@k: the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374, eq. 1) from `n`
  samples of which `c` are correct, `1 - C(n-c, k) / C(n, k)`, computed as their
  numerically stable product `1 - prod_{i=n-c+1}^{n} (1 - k/i)`.
* Confidence intervals: percentile bootstrap over items (Efron & Tibshirani 1993, ch. 13),
  for one model's metric and for the paired difference candidate - base (the same item
  indices resampled for both, so item difficulty cancels).
* Paired tests of candidate vs base on the same items:
  - per-item 0/1 outcomes (greedy accuracy, multiple-choice accuracy): McNemar's test, a
    two-sided binomial test of the discordant items against 1/2 (Dietterich 1998,
    "Approximate statistical tests for comparing supervised classification learning
    algorithms"), in its mid-p form (Fagerland, Lydersen & Laake 2013, "The McNemar test
    for binary matched-pairs data: mid-p and asymptotic are better than exact
    conditional"): it uses only the items where the two models disagree, has no
    resampling noise, and holds its level at any sample size without the exact test's
    conservatism (with ~20 discordant items the exact test rejects a true null about 3% of
    the time at alpha 0.05, mid-p about 5%).
  - any other metric (pass@k from n samples, per-token NLL): a paired permutation
    (sign-flip) test: under the null the candidate and base labels of each item are
    exchangeable, so the statistic's null distribution comes from swapping them per
    item. Exact (all 2^n swaps) when that is at most `resamples`, else Monte Carlo with
    the +1 correction; the p-value is what `scipy.stats.permutation_test` returns for the
    same statistic. Unlike a bootstrap p-value it holds its level at small sample sizes.
* Several significance rules at once: Holm's step-down adjustment (Holm 1979), which
  controls the family-wise error rate without independence assumptions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct: P(at least one of k drawn without
    replacement from the n is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ratio(x: ArrayLike, w: Optional[ArrayLike] = None) -> float:
    """sum(x) / sum(w) (the mean of x when w is None)."""
    x = np.asarray(x, dtype=float)
    return float(x.sum() / (np.asarray(w, dtype=float).sum() if w is not None else len(x)))


def _weights(x: np.ndarray, w: Optional[ArrayLike]) -> np.ndarray:
    return np.ones_like(x) if w is None else np.asarray(w, dtype=float)


def _resampled_ratios(x: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return x[idx].sum(axis=1) / w[idx].sum(axis=1)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_indices(n_items: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_items] item indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_items, size=(resamples, n_items))


def bootstrap_ci(
    x: ArrayLike, w: Optional[ArrayLike] = None, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of `ratio(x, w)` over items."""
    x = np.asarray(x, dtype=float)
    idx = bootstrap_indices(len(x), resamples, seed)
    return _percentiles(_resampled_ratios(x, _weights(x, w), idx), level)


def paired_bootstrap_ci(
    xc: ArrayLike,
    xb: ArrayLike,
    wc: Optional[ArrayLike] = None,
    wb: Optional[ArrayLike] = None,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `ratio(xc, wc) - ratio(xb, wb)`, resampling the same
    items for both models."""
    xc, xb = np.asarray(xc, dtype=float), np.asarray(xb, dtype=float)
    if len(xc) != len(xb):
        raise ValueError(f"paired samples differ in length ({len(xc)} vs {len(xb)})")
    idx = bootstrap_indices(len(xc), resamples, seed)
    delta = _resampled_ratios(xc, _weights(xc, wc), idx) - _resampled_ratios(xb, _weights(xb, wb), idx)
    return _percentiles(delta, level)


def mcnemar_midp(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> float:
    """Two-sided mid-p McNemar p-value of paired 0/1 outcomes `a` (candidate) and `b` (base):
    with k the smaller of the two discordant counts and X ~ Binomial(their sum, 1/2),
    2 P(X < k) + P(X = k) (exact integer arithmetic; 1.0 when none disagree)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in shape ({a.shape} vs {b.shape})")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, (2 * sum(math.comb(n, i) for i in range(k)) + math.comb(n, k)) / 2**n)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of paired preferences (ties left out): with k the smaller of
    `wins` and `losses` and X ~ Binomial(wins + losses, 1/2), min(1, 2 P(X <= k)); 1.0 with
    no untied item. (McNemar's exact test is the same test on 0/1 outcomes.)"""
    n, k = wins + losses, min(wins, losses)
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0 (wins {wins}, losses {losses})")
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _flip_masks(n: int, resamples: int, seed: int) -> tuple[np.ndarray, bool]:
    """Swap masks [R, n]: every one of the 2^n when that is at most `resamples`, else random."""
    if n <= 20 and 2**n <= resamples:
        return np.array(list(itertools.product([False, True], repeat=n)), dtype=bool).reshape(-1, n), True
    return np.random.default_rng(seed).random((resamples, n)) < 0.5, False


def paired_permutation_test(
    xc: ArrayLike,
    xb: ArrayLike,
    wc: Optional[ArrayLike] = None,
    wb: Optional[ArrayLike] = None,
    resamples: int = 10_000,
    seed: int = 0,
) -> float:
    """Two-sided p-value of `ratio(xc, wc) - ratio(xb, wb)` under per-item label swapping."""
    xc, xb = np.asarray(xc, dtype=float), np.asarray(xb, dtype=float)
    wc, wb = _weights(xc, wc), _weights(xb, wb)
    if len(xc) != len(xb):
        raise ValueError(f"paired samples differ in length ({len(xc)} vs {len(xb)})")
    observed = ratio(xc, wc) - ratio(xb, wb)
    flip, exact = _flip_masks(len(xc), resamples, seed)
    xc_s, xb_s = np.where(flip, xb, xc), np.where(flip, xc, xb)
    wc_s, wb_s = np.where(flip, wb, wc), np.where(flip, wc, wb)
    null = xc_s.sum(1) / wc_s.sum(1) - xb_s.sum(1) / wb_s.sum(1)
    # ties within floating-point noise count as at least as extreme (as scipy does)
    eps = 1e-14 * max(abs(observed), 1.0)
    adjust = 0 if exact else 1
    greater = ((null >= observed - eps).sum() + adjust) / (len(null) + adjust)
    less = ((null <= observed + eps).sum() + adjust) / (len(null) + adjust)
    return float(min(1.0, 2 * min(greater, less)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the i-th smallest p times (m - i + 1),
    made monotone (a larger p never gets a smaller adjusted value), capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def is_binary(*arrays: ArrayLike) -> bool:
    """Whether every value is 0 or 1 (per-item outcomes for McNemar's test)."""
    return all(np.isin(np.asarray(a, dtype=float), (0.0, 1.0)).all() for a in arrays)
