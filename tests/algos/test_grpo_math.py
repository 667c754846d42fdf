"""GRPO advantages, aggregation weights and the clipped loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.algos.grpo import clipped_policy_loss, group_advantages, token_weights, zero_std_groups


def test_group_advantages_mean_centred_and_std_normalised():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4, std_normalize=True)
    std = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # all-equal rewards: no signal, no NaN
    plain = group_advantages(r, 4, std_normalize=False)
    assert plain[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert zero_std_groups(r, 4).tolist() == [False, True]


def test_token_weights_for_each_aggregation():
    assert token_weights([2, 4], "token_mean", 8) == [1 / 6, 1 / 6]
    assert token_weights([2, 4], "seq_mean_token_mean", 8) == [1 / 4, 1 / 8]
    assert token_weights([2, 4], "seq_mean_token_sum_norm", 8) == [1 / 16, 1 / 16]


def test_clipped_loss_matches_hand_computation():
    logp = torch.tensor([[math.log(0.5), math.log(0.9)]])
    old = torch.tensor([[math.log(0.25), math.log(0.9)]])  # ratios 2.0 and 1.0
    adv = torch.tensor([[1.0, 1.0]])
    w = torch.tensor([[0.5, 0.5]])
    loss, m = clipped_policy_loss(logp, old, adv, w, clip_low=0.2, clip_high=0.28)
    # token 1: max(-1*2, -1*1.28) = -1.28 ; token 2: -1  -> 0.5*(-1.28) + 0.5*(-1)
    assert loss.item() == pytest.approx(-1.14)
    assert m["clipped_tokens"].item() == 1 and m["tokens"].item() == 2
    # negative advantage: ratio 2 is not clipped from above (pessimistic bound keeps -adv*ratio)
    loss, _ = clipped_policy_loss(logp, old, -adv, w, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)


def test_kl_penalty_k3_and_masking():
    logp = torch.tensor([[math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), 5.0]])
    w = torch.tensor([[1.0, 0.0]])  # second token is padding
    loss, m = clipped_policy_loss(logp, logp, torch.zeros(1, 2), w, 0.2, 0.2, ref_logp=ref, kl_coef=0.1)
    kl = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25/0.5)
    assert m["kl_sum"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)


def test_loss_gradient_is_zero_for_zero_advantage():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, logp.detach(), torch.zeros(1, 2), torch.ones(1, 2), 0.2, 0.2)
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0
