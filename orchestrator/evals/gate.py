"""Candidate vs base per metric (values, intervals, paired test) and the promotion gate.

`compare` turns two models' per-item scores of one metric into a `Comparison`: each
model's value with its bootstrap interval, the paired difference candidate - base with
its interval, and the paired test's p-value (mid-p McNemar for per-item 0/1 outcomes, a
paired permutation test otherwise; orchestrator/algos/eval_stats.py says why).

`decide` applies the gate: every rule must hold to PROMOTE. A rule's delta is signed so
that positive is better (for a lower-is-better metric such as NLL, base - candidate), in
the metric's unit or, with `relative`, as a fraction of the base's value. The p-values of
all `significant` rules are adjusted together with Holm's method before comparing them to
alpha, so adding rules does not inflate the chance of promoting by luck.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from orchestrator.algos import eval_stats as st
from orchestrator.config.evaluation import GateRule
from orchestrator.errors import ConfigError


@dataclass
class Comparison:
    task: str
    metric: str
    higher_is_better: bool
    items: int
    candidate: float
    candidate_ci: tuple[float, float]
    base: float
    base_ci: tuple[float, float]
    delta: float
    """candidate - base, in the metric's unit."""
    delta_ci: tuple[float, float]
    p_value: float
    test: str
    """mcnemar_midp | paired_permutation | sign_test."""
    outcomes: Optional[dict[str, Any]] = None
    """Paired metrics (a preference task's win rate): wins, ties, losses and per-item W/T/L."""

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"

    @property
    def improvement(self) -> float:
        """The delta signed so that positive is better."""
        return self.delta if self.higher_is_better else -self.delta


@dataclass
class StatSettings:
    confidence: float = 0.95
    bootstrap_resamples: int = 2000
    permutation_resamples: int = 10000
    seed: int = 0


def compare(task: str, metric: str, higher_is_better: bool, cand, base, s: StatSettings) -> Comparison:
    """`cand`, `base`: the two models' `MetricScores` of the metric on the same items."""
    if len(cand.x) != len(base.x):
        raise ValueError(f"{task}/{metric}: {len(cand.x)} candidate items vs {len(base.x)} base items")
    kw = dict(level=s.confidence, resamples=s.bootstrap_resamples, seed=s.seed)
    binary = cand.w is None and base.w is None and st.is_binary(cand.x, base.x)
    p = (
        st.mcnemar_midp(cand.x, base.x)
        if binary
        else st.paired_permutation_test(cand.x, base.x, cand.w, base.w, s.permutation_resamples, s.seed)
    )
    return Comparison(
        task=task,
        metric=metric,
        higher_is_better=higher_is_better,
        items=len(cand.x),
        candidate=st.ratio(cand.x, cand.w),
        candidate_ci=st.bootstrap_ci(cand.x, cand.w, **kw),
        base=st.ratio(base.x, base.w),
        base_ci=st.bootstrap_ci(base.x, base.w, **kw),
        delta=st.ratio(cand.x, cand.w) - st.ratio(base.x, base.w),
        delta_ci=st.paired_bootstrap_ci(cand.x, base.x, cand.w, base.w, **kw),
        p_value=p,
        test="mcnemar_midp" if binary else "paired_permutation",
    )


@dataclass
class RuleResult:
    rule: dict[str, Any]
    metric: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    p_adjusted: Optional[float] = None


@dataclass
class Decision:
    rules: list[RuleResult]

    @property
    def promote(self) -> bool:
        return bool(self.rules) and all(r.passed for r in self.rules)

    @property
    def verdict(self) -> str:
        return "PROMOTE" if self.promote else "REJECT"


def resolve_metric(name: str, available: dict[str, bool], key: str) -> str:
    """`task/metric` for a rule's metric: itself, or the one task metric of that name."""
    if name in available:
        return name
    matches = [k for k in available if k.split("/", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    hint = f"it is reported by {', '.join(matches)}; name one" if matches else "valid"
    raise ConfigError(f"{key}.metric={name!r} is ambiguous or unknown ({hint}: {', '.join(available)})")


def default_rules(primary: str) -> list[GateRule]:
    """The gate when eval.gate is empty: the first task's primary metric improves significantly."""
    return [GateRule(metric=primary, significant=True)]


def _signed(c: Comparison, relative: bool) -> float:
    if not relative:
        return c.improvement
    if c.base == 0:
        return math.copysign(math.inf, c.improvement) if c.improvement else 0.0
    return c.improvement / abs(c.base)


def _fmt(v: float, relative: bool) -> str:
    return f"{v:+.1%}" if relative else f"{v:+.4g}"


def _check_rule(rule: GateRule, c: Comparison, p_adj: Optional[float], alpha: float) -> tuple[bool, list[str]]:
    ok, reasons = True, []
    gain = _signed(c, rule.relative)
    if rule.min_delta is not None:
        good = gain >= rule.min_delta
        ok &= good
        reasons.append(
            f"improvement {_fmt(gain, rule.relative)} {'>=' if good else '<'} {_fmt(rule.min_delta, rule.relative)}"
        )
    if rule.max_regression is not None:
        good = gain >= -rule.max_regression
        ok &= good
        reasons.append(
            f"change {_fmt(gain, rule.relative)} {'within' if good else 'beyond'} the allowed regression "
            f"{_fmt(-rule.max_regression or 0.0, rule.relative)}"
        )
    if rule.significant:
        good = p_adj is not None and p_adj < alpha and c.improvement > 0
        ok &= good
        direction = "better" if c.improvement > 0 else "not better"
        reasons.append(
            f"{c.test} p={c.p_value:.3g} (Holm {p_adj:.3g}) {'<' if p_adj < alpha else '>='} alpha {alpha:g}, "
            f"candidate {direction}"
        )
    return bool(ok), reasons


def decide(comparisons: dict[str, Comparison], rules: list[tuple[str, GateRule]], alpha: float) -> Decision:
    """`rules`: (resolved `task/metric`, rule) pairs. PROMOTE when every rule holds."""
    sig = [i for i, (_, r) in enumerate(rules) if r.significant]
    adjusted = dict(zip(sig, st.holm([comparisons[rules[i][0]].p_value for i in sig])))
    out = []
    for i, (key, rule) in enumerate(rules):
        passed, reasons = _check_rule(rule, comparisons[key], adjusted.get(i), alpha)
        out.append(RuleResult(asdict(rule), key, passed, reasons, adjusted.get(i)))
    return Decision(out)
