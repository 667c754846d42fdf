"""Group-relative policy optimisation: advantages, per-token weights and the clipped loss.

GRPO (DeepSeekMath, arXiv:2402.03300): sample G completions per prompt; the advantage
of completion i is its reward minus the group mean, divided by the group std; the loss
is PPO's clipped surrogate (Schulman et al., arXiv:1707.06347) on every completion token,
averaged per sequence and then over sequences, plus an optional KL penalty to a frozen
reference (the k3 estimator, exp(ref - logp) - (ref - logp) - 1). Optionally each token's
policy-gradient term is reweighted by truncated importance sampling against the rollout
engine's log-probs (`stage.tis_cap`; orchestrator/algos/off_policy.py).

Variants selected by config:
* Dr. GRPO (arXiv:2503.20783): no std normalisation (`std_normalize=false`) and token
  sums divided by a constant (max completion length) instead of each sequence's length,
  removing the length and difficulty biases (`loss_agg=seq_mean_token_sum_norm`).
* DAPO (arXiv:2503.14476): asymmetric clipping (`clip_high` > `clip_low`), token-level
  mean over the whole batch (`loss_agg=token_mean`), and dropping groups whose rewards
  are all equal (`filter_zero_std_groups`; they carry no signal). DAPO refills the batch
  by sampling more prompts; we train on the smaller batch instead (no extra rollouts).

Aggregation is expressed as a per-token weight computed on the driver over the *global*
batch, so the loss is the same whatever the split over ranks and micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orchestrator.algos.advantages import group_relative

group_advantages = group_relative
"""GRPO's group-relative advantages (`orchestrator.algos.advantages.group_relative`)."""

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: groups whose rewards are all equal."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def token_weights(lengths: Sequence[int], agg: str, max_new_tokens: int) -> list[float]:
    """Per-sequence weight of each of its completion tokens, for the global batch."""
    n = len(lengths)
    if n == 0:
        return []
    if agg == "token_mean":
        total = max(sum(lengths), 1)
        return [1.0 / total] * n
    if agg == "seq_mean_token_mean":
        return [1.0 / (max(length, 1) * n) for length in lengths]
    if agg == "seq_mean_token_sum_norm":
        return [1.0 / (max_new_tokens * n)] * n
    raise ValueError(f"unknown loss aggregation {agg!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All tensors [B, T] (advantages broadcast per token); weights are 0 off-completion.
    `is_weights` (no gradient) multiply each token's clipped policy-gradient term, not the KL
    term: the truncated importance weights of `orchestrator.algos.off_policy`.

    Returns the weighted sum (the caller scales for gradient averaging) and summed metrics:
    clipped-token count, KL sum and token count (weighted by the mask, for means later).
    """
    mask = (weights > 0).float()
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics = {"clipped_tokens": ((clipped > unclipped).float() * mask).sum().detach(), "tokens": mask.sum().detach()}
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        metrics["kl_sum"] = (kl * mask).sum().detach()
        if kl_coef:
            per_token = per_token + kl_coef * kl
    return (per_token * weights).sum(), metrics
