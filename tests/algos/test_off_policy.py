"""Truncated importance sampling and the trainer / rollout-engine log-prob mismatch against
hand-computed values, alone, inside the clipped GRPO loss, and in GRPO's worker-side loss on
a real (tiny) model."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.algos.grpo import clipped_policy_loss
from orchestrator.algos.off_policy import logprob_mismatch, reduce_mismatch, truncated_is_weights

LOG2 = math.log(2.0)


def _logs(*p: float) -> torch.Tensor:
    return torch.tensor([[math.log(x) for x in p]])


def test_truncated_is_weights_are_capped_ratios_without_gradient():
    old = _logs(0.5, 0.2, 0.9).requires_grad_()
    rollout = _logs(0.25, 0.4, 0.9)  # ratios 2.0, 0.5, 1.0
    w = truncated_is_weights(old, rollout, cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.5, 0.5, 1.0])
    assert not w.requires_grad
    assert truncated_is_weights(old, rollout, cap=10.0).tolist()[0] == pytest.approx([2.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, rollout, cap=0.0)


def test_mismatch_statistics_cover_completion_tokens_only():
    old = _logs(0.5, 0.2, 0.9, 0.1)
    rollout = torch.cat([_logs(0.25, 0.4, 0.9), torch.tensor([[0.0]])], dim=1)  # last: padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    m = logprob_mismatch(old, rollout, mask, cap=1.5)
    assert m["logprob_diff_sum"].item() == pytest.approx(2 * LOG2)
    assert m["logprob_diff_max"].item() == pytest.approx(LOG2)  # the pad's |log 0.1 - 0| is left out
    assert m["logprob_diff_tokens"].item() == 3
    assert m["tis_clipped_tokens"].item() == 1  # only the ratio 2 exceeds the cap
    assert "tis_clipped_tokens" not in logprob_mismatch(old, rollout, mask)
    empty = logprob_mismatch(old, rollout, torch.zeros_like(mask))
    assert empty["logprob_diff_max"].item() == 0 and empty["logprob_diff_tokens"].item() == 0


def test_reduce_mismatch_means_over_tokens_and_maxes_over_entries():
    stats = [
        {"logprob_diff_sum": 1.0, "logprob_diff_max": 0.3, "logprob_diff_tokens": 4.0, "tis_clipped_tokens": 1.0},
        {"logprob_diff_sum": 0.5, "logprob_diff_max": 0.7, "logprob_diff_tokens": 1.0, "tis_clipped_tokens": 0.0},
        {"loss_sum": 2.0},  # a rank whose micro-batches held no completion tokens
    ]
    assert reduce_mismatch(stats) == pytest.approx(
        {"rollout/logprob_diff_mean": 0.3, "rollout/logprob_diff_max": 0.7, "rollout/tis_clip_frac": 0.2}
    )
    assert reduce_mismatch([{"loss_sum": 1.0}]) == {}  # the engine sent no log-probs


def test_clipped_loss_with_is_weights_matches_hand_computation():
    logp = _logs(0.5, 0.2, 0.9).requires_grad_()
    old = logp.detach()  # on-policy: ratio 1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    weights = torch.tensor([[0.5, 0.5, 0.0]])  # third token: padding
    is_w = torch.tensor([[1.5, 0.5, 1.0]])
    loss, _ = clipped_policy_loss(logp, old, adv, weights, 0.2, 0.2, is_weights=is_w)
    # per token -adv * ratio = [-1, 1, -2]; * w_is = [-1.5, 0.5, -2]; * weights -> -0.75 + 0.25
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.75, 0.25, 0.0])
    plain, _ = clipped_policy_loss(logp, old, adv, weights, 0.2, 0.2)
    assert plain.item() == pytest.approx(0.0)
    # Weights of one change nothing, bit for bit.
    ones, _ = clipped_policy_loss(logp, old, adv, weights, 0.2, 0.2, is_weights=torch.ones(1, 3))
    assert torch.equal(ones, plain)


def test_kl_term_is_not_reweighted():
    logp = _logs(0.5, 0.9)
    ref = _logs(0.25, 0.9)
    w = torch.tensor([[1.0, 1.0]])
    kwargs = dict(ref_logp=ref, kl_coef=0.1)
    plain, _ = clipped_policy_loss(logp, logp, torch.zeros(1, 2), w, 0.2, 0.2, **kwargs)
    weighted, _ = clipped_policy_loss(
        logp, logp, torch.zeros(1, 2), w, 0.2, 0.2, is_weights=torch.full((1, 2), 2.0), **kwargs
    )
    assert weighted.item() == pytest.approx(plain.item()) and plain.item() == pytest.approx(0.1 * (0.5 + LOG2 - 1))


@pytest.fixture(scope="module")
def tiny_model():
    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(name="tiny_llama"), torch.float32)


def _grpo_mb(model, shift: float | None, tis_cap: float | None) -> dict:
    """Two rows; with `shift`, rollout log-probs = the model's own minus `shift` on the completions."""
    from orchestrator.data.collate import rl_collate
    from orchestrator.models.logprobs import token_logprobs

    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "prompt_len": 3, "weight": 1 / 6, "adv": 1.0},
        {"input_ids": [11, 12, 13, 14], "prompt_len": 2, "weight": 1 / 4, "adv": -0.5},
    ]
    ctx = {"world_size": 1, "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0, "logits_chunk_mb": 1024}
    if shift is not None:
        with torch.no_grad():
            logp, _ = token_logprobs(model, rl_collate(rows, 0), 1024)
        for i, r in enumerate(rows):
            n, start = len(r["input_ids"]), r["prompt_len"] - 1
            r["rollout_logp"] = (logp[i, start : n - 1] - shift).tolist()
    if tis_cap is not None:
        ctx["tis_cap"] = tis_cap
    return dict(rl_collate(rows, 0), **ctx)


def test_grpo_loss_applies_tis_and_reports_the_mismatch(tiny_model):
    from orchestrator.stages.grpo import GrpoStage

    plain, m_plain = GrpoStage.loss(tiny_model, _grpo_mb(tiny_model, None, None))
    assert "logprob_diff_sum" not in m_plain
    # Rollout log-probs without a cap: the loss is unchanged, bit for bit; the mismatch is measured.
    logged, m = GrpoStage.loss(tiny_model, _grpo_mb(tiny_model, LOG2, None))
    assert torch.equal(logged, plain)
    tokens = 3 + 2
    assert m["logprob_diff_tokens"].item() == tokens
    assert m["logprob_diff_sum"].item() == pytest.approx(tokens * LOG2, rel=1e-5)
    assert m["logprob_diff_max"].item() == pytest.approx(LOG2, rel=1e-5)
    # The engine put half the trainer's probability on every sampled token: ratio 2, capped at
    # 1.5, so every token's policy-gradient term (and the loss, without KL) is 1.5 times as large.
    capped, m = GrpoStage.loss(tiny_model, _grpo_mb(tiny_model, LOG2, 1.5))
    assert capped.item() == pytest.approx(1.5 * plain.item(), rel=1e-5)
    assert m["tis_clipped_tokens"].item() == tokens
    uncapped, _ = GrpoStage.loss(tiny_model, _grpo_mb(tiny_model, LOG2, 10.0))
    assert uncapped.item() == pytest.approx(2.0 * plain.item(), rel=1e-5)
    same, _ = GrpoStage.loss(tiny_model, _grpo_mb(tiny_model, 0.0, 1.5))  # no mismatch: weights 1
    assert same.item() == pytest.approx(plain.item(), rel=1e-6)
