"""PPO pieces (KL estimators, KL-shaped rewards, whitening, clipped value loss, adaptive KL)
against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.algos.advantages import gae
from orchestrator.algos.ppo import AdaptiveKL, clipped_value_loss, kl_estimate, kl_shaped_rewards, whiten


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(2.0)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1.0)  # exp(-d) = 0.5
    # equal policies: every estimator is 0
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(logp, logp, kind).item() == 0.0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_k3_is_unbiased_and_k1_too_on_samples_from_the_policy():
    # tokens sampled from p; KL(p || q) exactly vs the sample means of the estimators
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[idx], q.log()[idx]
    assert kl_estimate(logp, ref, "k1").mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_estimate(logp, ref, "k3").mean().item() == pytest.approx(exact, rel=0.03)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    logp = torch.tensor([[0.0, -1.0, -2.0, -1.0, 0.0]] * 3)
    ref = torch.tensor([[0.0, -1.5, -1.0, -1.0, 0.0]] * 3)
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0, -1.0, 5.0]), mask, logp, ref, kl_coef=0.1, kind="k1")
    # row 0: KL 0.5, -1.0, 0.0 on tokens 1..3; the score lands on token 3
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1, 2.0, 0.0])
    assert kl[0].tolist() == pytest.approx([0.0, 0.5, -1.0, 0.0, 0.0])
    # row 1: one token carries its KL penalty and the score
    assert rewards[1].tolist() == pytest.approx([0.0, 0.0, -1.0 + 0.1, 0.0, 0.0])
    # row 2: no completion token, no reward anywhere
    assert rewards[2].abs().sum() == 0
    # without log-probs: the score alone
    plain, kl0 = kl_shaped_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert plain[0].tolist() == [0.0, 0.0, 0.0, 2.0, 0.0] and kl0.abs().sum() == 0


def test_whiten_uses_masked_entries_only():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    w = whiten(x, mask)
    # mean 2, population std 1 over the two masked entries; the unmasked one is 0
    assert w.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 3.0, 0.0], abs=1e-6)


def test_clipped_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 3.0]])
    w = torch.tensor([[0.5, 0.5, 0.0]])  # the last token is padding
    loss, m = clipped_value_loss(v, old, ret, w, clip=0.2)
    # token 0: V-R = 1, clipped V = 0.7 -> 0.49: the unclipped error wins (1.0)
    # token 1: V-R = -1, V = V_old: both 1.0
    assert loss.item() == pytest.approx(0.5 * (0.5 * 1.0 + 0.5 * 1.0))
    assert m["vf_clipped_tokens"].item() == 0
    # the clipped term wins when the update moved V towards R past the clip
    loss, m = clipped_value_loss(
        torch.tensor([[0.9]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2
    )
    assert loss.item() == pytest.approx(0.5 * (0.2 - 1.0) ** 2)
    assert m["vf_clipped_tokens"].item() == 1
    # no clip: plain squared error
    loss, _ = clipped_value_loss(
        torch.tensor([[0.9]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), None
    )
    assert loss.item() == pytest.approx(0.5 * 0.01)


def test_clipped_value_loss_gradient_stops_past_the_clip():
    v = torch.tensor([[0.9]], requires_grad=True)
    loss, _ = clipped_value_loss(v, torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert v.grad.item() == 0.0  # the clipped branch holds V at 0.2: no gradient flows


def test_adaptive_kl_controller():
    fixed = AdaptiveKL(0.1)
    assert fixed.update(5.0, 64) == 0.1
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    # KL 12 -> error clipped to +0.2 -> coef * (1 + 0.2 * 10 / 100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * 1.02)
    # KL 3 -> error -0.5 clipped to -0.2
    assert ctl.update(3.0, 10) == pytest.approx(0.1 * 1.02 * 0.98)
    # on target: unchanged
    before = ctl.coef
    assert ctl.update(6.0, 10) == pytest.approx(before)


def test_gae_over_kl_shaped_rewards_end_to_end():
    mask = torch.tensor([[1, 1, 0]])
    logp = torch.tensor([[-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0]])
    rewards, _ = kl_shaped_rewards(torch.tensor([1.0]), mask, logp, ref, kl_coef=0.5)
    values = torch.tensor([[0.2, 0.4, 9.0]])
    adv, ret = gae(rewards.float(), values, mask, gamma=1.0, lam=1.0)
    # rewards: -0.5 then 1.0; returns 0.5, 1.0; advantages = returns - values
    assert ret.tolist()[0] == pytest.approx([0.5, 1.0, 0.0])
    assert adv.tolist()[0] == pytest.approx([0.3, 0.6, 0.0])


def test_critic_values_line_up_with_the_token_weights_filler_rows_included():
    from orchestrator.config.schema import ModelConfig
    from orchestrator.data.collate import rl_collate, rl_dummy
    from orchestrator.models import build_model
    from orchestrator.stages.ppo import PpoStage

    critic = build_model(ModelConfig(name="tiny_llama"), torch.float32, head="value")
    rows = [{"input_ids": [5, 6, 7, 8], "prompt_len": 2, "weight": 0.5, "adv": 1.0}]
    for mb in (rl_collate(rows, 0), rl_collate([rl_dummy(0)], 0)):
        values = PpoStage.values(critic, mb)
        assert values.shape == mb["weights"].shape
        ctx = {"old_values": values.detach(), "returns": torch.ones_like(values), "value_clip": 0.2, "world_size": 1}
        mb = dict(mb, vf_weights=mb["weights"], **ctx)
        loss, metrics = PpoStage.value_loss(critic, mb)
        loss.backward()  # a filler row gives a zero loss that still reaches every parameter's graph
        assert torch.isfinite(loss)
