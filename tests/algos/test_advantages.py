"""Advantage estimators (GAE, group-relative, RLOO, REINFORCE++) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.algos.advantages import gae, group_relative, reinforce_pp, rloo
from orchestrator.algos.grpo import group_advantages


def test_gae_gamma_lambda_one_is_return_minus_value():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # deltas 0.1, 0.1, 0.3 summed from the right; returns = the final reward everywhere
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.3])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])


def test_gae_discounted():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # deltas: 0.9*0.6-0.5=0.04, 0.9*0.7-0.6=0.03, 1-0.7=0.3; A_t = delta_t + 0.45 A_{t+1}
    assert adv.tolist()[0] == pytest.approx([0.04 + 0.45 * 0.165, 0.165, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.5 + 0.11425, 0.6 + 0.165, 1.0])


def test_gae_masks_padding_and_skips_holes():
    # right padding: the pad's reward and value are ignored, the value after the end is 0
    adv, ret = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.6, 3.0]]), torch.tensor([[1, 1, 0]]), 1, 1)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.0]) and ret.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])
    # a hole (e.g. an environment token): the recursion passes over it
    adv, ret = gae(torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[0.5, 9.0, 0.7]]), torch.tensor([[1, 0, 1]]), 1, 1)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.0, 0.3]) and ret.tolist()[0] == pytest.approx([1.0, 0.0, 1.0])


def test_group_relative_is_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)
    want = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]
    assert group_relative(r, 4, True)[:4].tolist() == pytest.approx(want, rel=1e-5)
    assert torch.equal(group_relative(r, 4, False), group_advantages(r, 4, False))


def test_rloo_leave_one_out_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0])
    adv = rloo(r[:8], 4)
    # completion 0: 1 - mean(0, 0, 1) = 2/3
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    assert rloo(r[8:], 2).tolist() == [3.0, -3.0]  # G=2: the other sample is the baseline
    with pytest.raises(ValueError, match="at least 2"):
        rloo(r, 1)


def test_reinforce_pp_without_kl_normalises_returns_over_batch_tokens():
    adv = reinforce_pp(torch.tensor([1.0, 0.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    # token returns 1, 1 | 0 -> mean 2/3, population std sqrt(2)/3
    s = math.sqrt(2) / 3
    assert adv.tolist() == [pytest.approx([(1 / 3) / s, (1 / 3) / s, 0.0]), pytest.approx([-(2 / 3) / s, 0.0, 0.0])]


def test_reinforce_pp_kl_in_the_reward():
    mask = torch.ones(1, 3)
    logp = torch.tensor([[0.5, -1.0, 0.2]])
    adv = reinforce_pp(torch.tensor([1.0]), mask, logp, torch.zeros(1, 3), kl_coef=0.1)
    # token rewards -0.05, 0.1, -0.02 + 1 -> returns 1.03, 1.08, 0.98 -> mean 1.03, std sqrt(0.005/3)
    s = math.sqrt(0.005 / 3)
    assert adv.tolist()[0] == pytest.approx([0.0, 0.05 / s, -0.05 / s], abs=1e-5)
    # discounting: returns -0.05 + 0.5*(0.1 + 0.5*0.98), 0.1 + 0.49, 0.98
    adv = reinforce_pp(torch.tensor([1.0]), mask, logp, torch.zeros(1, 3), kl_coef=0.1, gamma=0.5)
    ret = torch.tensor([-0.05 + 0.5 * 0.59, 0.59, 0.98], dtype=torch.float64)
    want = (ret - ret.mean()) / ret.std(unbiased=False)
    assert adv.tolist()[0] == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        reinforce_pp(torch.tensor([1.0]), mask, kl_coef=0.1)
