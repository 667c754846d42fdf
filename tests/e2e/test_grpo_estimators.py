"""GRPO's other advantage estimators end to end (tiny model, CPU): with `stage.estimator=rloo`
and `stage.estimator=reinforce_pp` (the KL penalty to a frozen reference in the per-token reward), the
policy learns to write a digit: the reward rises over a few steps."""

from __future__ import annotations

from statistics import mean

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

BASE = [
    "+experiment=grpo_math",
    "debug=cpu",
    "run.init_from=null",
    "stage.prompts_per_step=4",
    "rollout.n=4",
    "eval.samples=0",
    "checkpoint.every_steps=0",
    "checkpoint.export_hf=false",
    "stage.rewards=[{name:format,kwargs:{pattern:'[0-9]'}}]",
    "stage.log_samples_every=0",
]


@pytest.mark.parametrize(
    "variant",
    [
        ["stage.estimator=rloo", "method=full", "train.lr=1e-2", "train.max_steps=6"],
        ["stage.estimator=reinforce_pp", "method=full", "stage.kl_coef=0.05", "train.lr=1e-2", "train.max_steps=6"],
    ],
    ids=["rloo-full", "reinforce_pp-full-kl"],
)
def test_estimator_learns(run_main, variant):
    rc, run_dir = run_main(*BASE, *variant)
    assert rc == 0
    steps = read_metrics(run_dir)
    rewards = [m["reward_mean"] for m in steps]
    print(variant[0], rewards)
    assert mean(rewards[-2:]) > mean(rewards[:2]) + 0.1, rewards
    if "stage.kl_coef=0.05" in variant:
        assert all(m["kl"] >= 0 for m in steps) and any(m["kl"] > 0 for m in steps)
