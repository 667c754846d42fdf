"""PPO for language models with a learned reward: KL-shaped token rewards, the clipped value
loss and the KL controllers. The clipped policy loss is GRPO's (`algos/grpo.py`), and the
advantages are GAE (`algos/advantages.py`).

Following Ouyang et al. (InstructGPT, arXiv:2203.02155) and Ziegler et al. ("Fine-Tuning
Language Models from Human Preferences", arXiv:1909.08593), as verl and OpenRLHF implement it:

* token reward r_t = -beta * KL_t (per completion token) plus the sequence's score on its
  last token (`kl_shaped_rewards`); KL_t is one of Schulman's estimators of
  KL(pi || pi_ref) from samples of pi ("Approximating KL Divergence", 2020), with
  d = log pi(y_t) - log pi_ref(y_t): k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1;
* advantages: GAE over those rewards with the critic's values, whitened over the global
  batch's completion tokens (`whiten`; the returns are not whitened);
* critic: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per token
  (`clipped_value_loss`, PPO2's value clipping as in OpenAI baselines);
* beta: fixed, or Ziegler's adaptive controller (`AdaptiveKL`): the proportional error
  e = clip(KL / target - 1, -0.2, 0.2) moves beta by a factor 1 + e * n / horizon, n the
  samples of the step.

Deviation: the KL penalty is computed from the log-probs the trainer recomputes before the
update (verl's `old_log_prob`), not the rollout engine's, so an engine that samples with
other kernels or precision does not bias the penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi."""
    d = logp.double() - ref_logp.double()
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}: use one of {', '.join(KL_ESTIMATORS)}")


def kl_shaped_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B] (one per sequence), mask [B, T] -> (token rewards [B, T], per-token KL [B, T]).

    Each sequence's score lands on its last masked token; rows without one get nothing."""
    m = mask.to(torch.float64)
    kl = torch.zeros_like(m)
    if logp is not None and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kind) * m
    rewards = -kl_coef * kl
    pos = torch.arange(m.shape[1]).expand_as(m)
    last = torch.where(m > 0, pos, torch.full_like(pos, -1)).max(dim=1).values
    has = last >= 0
    rewards[has, last[has]] += scores.double()[has]
    return rewards, kl


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x normalised by the mean and (population) std of its masked entries; 0 off the mask."""
    m = mask.to(torch.float64)
    xd = x.double()
    n = m.sum().clamp(min=1)
    mean = (xd * m).sum() / n
    var = (((xd - mean) * m) ** 2).sum() / n
    out = (xd - mean) if shift_mean else xd
    return (out / (var.sqrt() + eps) * m).to(x.dtype)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over tokens of 0.5 * max((V - R)^2, (V_clipped - R)^2), with
    V_clipped = V_old + clip(V - V_old, -clip, clip); `clip=None`: plain squared error.

    Returns (loss, metrics): `vf_clipped_tokens` counts tokens where the clipped term won."""
    err = (values - returns) ** 2
    mask = (weights > 0).to(values.dtype)
    if clip is None:
        per_token = err
        clipped = torch.zeros_like(err)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        per_token = torch.maximum(err, err_clip)
        clipped = (err_clip > err).to(values.dtype)
    loss = 0.5 * (per_token * weights).sum()
    with torch.no_grad():
        metrics = {
            "vf_clipped_tokens": (clipped * mask).sum(),
            "value_sum": (values.detach() * mask).sum(),
            "value_err_sum": (err.detach() * mask).sum(),
        }
    return loss, metrics


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s adaptive KL coefficient (target=None: fixed at `coef`)."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_samples: int) -> float:
        """Move the coefficient after a step whose mean per-sequence KL was `kl`; returns it."""
        if self.target is not None and self.target > 0:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + err * n_samples / self.horizon
        return self.coef
