"""Advantage estimators for policy-gradient RL on sequences.

* `gae`: generalised advantage estimation (Schulman et al., "High-Dimensional Continuous
  Control Using Generalized Advantage Estimation", arXiv:1506.02438, ICLR 2016):
  delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l}, returns
  R_t = A_t + V_t. Tokens outside the mask are skipped (the recursion carries across them,
  as verl does for interleaved tool or environment tokens) and get 0.
* `group_relative`: GRPO (Shao et al., DeepSeekMath, arXiv:2402.03300): a completion's
  reward minus its group's mean, divided by the group's sample std (optional, Dr. GRPO
  drops it). One scalar per completion, broadcast over its tokens.
* `rloo`: REINFORCE leave-one-out (Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline
  for Free!", ICLR 2019 workshop; Ahmadian et al., arXiv:2402.14740): the baseline of
  completion i is the mean reward of the other G-1 completions of its prompt, so
  A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_j r_j). No std division.
* `reinforce_pp`: REINFORCE++ (Hu, arXiv:2501.03262): per-token reward
  r_t = -kl_coef (log pi(y_t) - log pi_ref(y_t)) (the k1 KL estimator) plus the sequence's
  reward on its last token; returns G_t = sum_{s >= t} gamma^(s-t) r_s; the advantage is
  G_t normalised by the mean and (population) std over every valid token of the *global* batch (no
  critic, no group baseline). The paper takes gamma = 1; we do too by default.

All functions are pure and run in float64 internally where sums of many terms meet.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "gae")
"""`stage.estimator` values of the RL stages (`gae` needs a critic: stage=ppo)."""


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values, mask [B, T] -> (advantages, returns) [B, T], 0 where mask is 0.

    The value after the last valid token is 0 (the episode ends there)."""
    m = mask.to(torch.float64)
    r, v = rewards.to(torch.float64) * m, values.to(torch.float64) * m
    b, t = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(b, dtype=torch.float64)
    last = torch.zeros(b, dtype=torch.float64)
    for i in reversed(range(t)):
        delta = r[:, i] + gamma * next_value - v[:, i]
        cur = delta + gamma * lam * last
        # masked tokens pass the recursion through unchanged
        last = m[:, i] * cur + (1 - m[:, i]) * last
        next_value = m[:, i] * v[:, i] + (1 - m[:, i]) * next_value
        adv[:, i] = cur * m[:, i]
    returns = (adv + v) * m
    return adv.to(rewards.dtype), returns.to(rewards.dtype)


def group_relative(rewards: torch.Tensor, group_size: int, std_normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N*G] (grouped consecutively) -> advantages [N*G]. Equal rewards -> 0."""
    r = rewards.view(-1, group_size).double()
    adv = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv.view(-1).float()


def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N*G] (grouped consecutively) -> leave-one-out advantages [N*G]."""
    if group_size < 2:
        raise ValueError(f"rloo needs at least 2 samples per prompt (got {group_size})")
    r = rewards.view(-1, group_size).double()
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).view(-1).float()


def reinforce_pp(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """rewards [B] (one per sequence), mask [B, T] (the sequence's completion tokens),
    optional logp / ref_logp [B, T] -> advantages [B, T], 0 off the mask.

    Normalisation is over all masked tokens of the batch passed in: pass the global batch."""
    from orchestrator.algos.ppo import kl_shaped_rewards

    m = mask.to(torch.float64)
    if kl_coef and (logp is None or ref_logp is None):
        raise ValueError("reinforce_pp with kl_coef > 0 needs logp and ref_logp")
    # the k1 penalty on every token, the sequence's reward on its last valid one
    token_r, _ = kl_shaped_rewards(rewards, mask, logp if kl_coef else None, ref_logp if kl_coef else None, kl_coef)
    returns = torch.zeros_like(m)
    running = torch.zeros(m.shape[0], dtype=torch.float64)
    for i in reversed(range(m.shape[1])):
        running = token_r[:, i] + gamma * running * m[:, i] + (1 - m[:, i]) * running
        returns[:, i] = running
    returns = returns * m
    n = m.sum().clamp(min=1)
    mean = returns.sum() / n
    var = (((returns - mean) * m) ** 2).sum() / n
    adv = (returns - mean) / (var.sqrt() + eps) * m
    return adv.float()
