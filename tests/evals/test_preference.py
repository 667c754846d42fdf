"""The preference task: each model's greedy completion scored by a reward function, the
candidate's win rate over the base with per-item win/tie/loss, an interval, and the sign test."""

from __future__ import annotations

import math

import pytest

from orchestrator.algos.eval_stats import sign_test
from orchestrator.config.compose import compose
from orchestrator.config.evaluation import EvalTaskKind, EvalTaskSpec
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.evals.gate import StatSettings
from orchestrator.evals.report import _metric, metrics_table
from orchestrator.evals.tasks import TASKS, GenerationSettings
from orchestrator.rollout.base import Completion


def longer_is_better(prompt: str, completion: str) -> float:
    """A toy reward: the longer the completion, the better (the prompt must be passed)."""
    assert prompt.startswith("Write about ")
    return float(len(completion))


class Scripted:
    """A model whose greedy completion of item i is `answers[i]`."""

    def __init__(self, answers: list[str], prompts: list):
        self.answers, self.prompts = answers, prompts

    def generate(self, prompts, sampling, seed):
        assert sampling.n == 1 and sampling.temperature == 0.0
        return [Completion([], self.answers[self.prompts.index(list(p))]) for p in prompts]


def _task(n: int, reward: str = "tests.evals.test_preference:longer_is_better"):
    items = [{"messages": [{"role": "user", "content": f"Write about {i}"}], "answer": None} for i in range(n)]
    spec = EvalTaskSpec(kind=EvalTaskKind.preference, reward=reward)
    return TASKS["preference"]("pref", spec, items, "test", GenerationSettings("exact_match", 8, [], 0)), items


def test_win_rate_counts_wins_ties_and_losses_with_the_sign_test():
    task, items = _task(10)
    prompts = [it["messages"] for it in items]
    cand = Scripted(["long answer"] * 7 + ["same"] * 2 + ["x"], prompts)  # 7 wins, 2 ties, 1 loss
    base = Scripted(["short"] * 7 + ["same"] * 2 + ["xx"], prompts)
    res_c, res_b = task.score(cand), task.score(base)
    assert res_c["reward"].x[:2] == [11.0, 11.0] and res_b["reward"].x[-1] == 2.0
    win, reward = task.compare(res_c, res_b, StatSettings(bootstrap_resamples=500, permutation_resamples=2000))
    assert win.key == "pref/win_rate" and win.test == "sign_test" and reward.key == "pref/reward"
    assert win.candidate == pytest.approx((7 + 0.5 * 2) / 10) and win.base == 0.5
    assert win.delta == pytest.approx(0.3) and win.candidate_ci[0] <= 0.8 <= win.candidate_ci[1]
    assert win.outcomes == {"wins": 7, "ties": 2, "losses": 1, "per_item": "WWWWWWWTTL"}
    assert win.p_value == pytest.approx(2 * (1 + 8) / 2**8)  # 7 of 8 untied: 2 P(X <= 1), X ~ Bin(8, 1/2)
    assert list(task.metrics()) == ["win_rate", "reward"]
    table = metrics_table({"statistics": {"confidence": 0.95}, "metrics": [_metric(win), _metric(reward)]})
    assert "| pref/win_rate: 7 wins, 2 ties, 1 losses |" in "\n".join(table)


def test_sign_test_against_the_binomial():
    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test(3, 9) == pytest.approx(2 * sum(math.comb(12, i) for i in range(4)) / 2**12)


def test_a_built_in_reward_scores_the_completion_against_the_items_answer():
    task, items = _task(2, reward="exact_match")
    for i, it in enumerate(items):
        it["answer"] = str(i)
    prompts = [it["messages"] for it in items]
    assert task.score(Scripted(["0", "9"], prompts))["reward"].x == [1.0, 0.0]


def test_a_preference_task_needs_a_reward(tmp_path):
    cfg, _ = compose(["stage=eval", "eval.tasks=[{kind:preference,source:p.jsonl}]", f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]: a preference task needs a reward"):
        validate(cfg)
