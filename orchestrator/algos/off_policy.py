"""Off-policy correction for samples drawn by a rollout engine: truncated importance sampling
and the trainer / engine log-prob mismatch.

A rollout engine (vLLM, or `transformers` `generate` in its own actor) computes with its own
kernels, batch shapes and, on GPU, often its own precision, so even on the same weights its
per-token log-probs differ from the trainer's: the samples come from a policy pi_rollout a
little off the pi_old that PPO's ratio assumes. Truncated importance sampling (TIS; Yao et
al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025; verl's
rollout importance sampling at token level, truncate mode) multiplies each completion token's
policy-gradient term by

    w_t = min(exp(logp_old_t - logp_rollout_t), cap)

where logp_old is the trainer's log-prob of the token under the policy version that sampled
it (the recomputed old log-probs when `num_iterations` > 1, else the detached current ones:
the same weights) and logp_rollout the engine's. The weight is a constant (no gradient);
truncating it from above bounds its variance at the cost of some bias. The KL penalty is not
reweighted.

The mismatch |logp_old - logp_rollout| per completion token (its mean and max) is worth
logging whether or not the correction is on: it says how far the engine is from the trainer.
Both compare with the distribution the engine sampled from: with temperature != 1 or top-p /
top-k truncation that is not the trainer's (untempered, untruncated) policy, and the
difference then includes that deliberate change, not only numerics.

Statistics are returned as sums (and a max) so that micro-batches and ranks combine exactly:
`reduce_mismatch` turns them into the logged means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

METRIC_PREFIX = "rollout/"


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token TIS weights min(exp(old_logp - rollout_logp), cap), without gradient; same shape."""
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    return torch.exp(old_logp.detach() - rollout_logp).clamp(max=cap)


def logprob_mismatch(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float | None = None
) -> dict[str, torch.Tensor]:
    """Mismatch statistics over the tokens where `mask` is true (completion tokens), all [B, T]:
    `logprob_diff_sum` (sum of |old - rollout|), `logprob_diff_max` (0 without tokens),
    `logprob_diff_tokens`, and with a cap `tis_clipped_tokens` (tokens whose ratio exceeds it)."""
    mask = mask.bool()
    diff = (old_logp.detach() - rollout_logp).abs()
    masked = torch.where(mask, diff, torch.zeros_like(diff))
    out = {
        "logprob_diff_sum": masked.sum(),
        "logprob_diff_max": masked.max() if masked.numel() else masked.sum(),
        "logprob_diff_tokens": mask.sum().to(diff.dtype),
    }
    if cap is not None:
        over = (old_logp.detach() - rollout_logp) > torch.log(torch.tensor(cap, dtype=diff.dtype))
        out["tis_clipped_tokens"] = (over & mask).sum().to(diff.dtype)
    return out


def reduce_mismatch(stats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`logprob_mismatch` sums from several micro-batches or ranks -> the logged metrics:
    `rollout/logprob_diff_mean`, `rollout/logprob_diff_max` and, with a cap,
    `rollout/tis_clip_frac`. Empty when no entry has any statistics."""
    tokens = sum(s.get("logprob_diff_tokens", 0.0) for s in stats)
    if not any("logprob_diff_tokens" in s for s in stats):
        return {}
    denom = tokens or 1.0
    out = {
        METRIC_PREFIX + "logprob_diff_mean": sum(s.get("logprob_diff_sum", 0.0) for s in stats) / denom,
        METRIC_PREFIX + "logprob_diff_max": max(s.get("logprob_diff_max", 0.0) for s in stats),
    }
    if any("tis_clipped_tokens" in s for s in stats):
        out[METRIC_PREFIX + "tis_clip_frac"] = sum(s.get("tis_clipped_tokens", 0.0) for s in stats) / denom
    return out
