"""Token log-probs of a causal LM without the full-vocabulary logits of a whole batch.

Every objective reads the model through these functions: the SFT loss, GRPO's policy,
old and reference log-probs, and evaluation. A 150k vocabulary makes 2.5 GB of fp32
logits per 4k-token row, so the LM head is applied over chunks of tokens whose fp32
logits stay under a budget, each chunk under activation checkpointing: backward
recomputes one chunk's logits at a time instead of keeping them all.

When the whole micro-batch fits the budget (one chunk), the plain path runs: the model's
own forward and one log-softmax, exactly as before chunking existed (the golden runs in
tests/golden stay bit-identical). Chunked and plain paths give the same values and
gradients up to float summation order (tests/models/test_logprobs.py).

How the chunks run inside the model: for the duration of one forward, the LM head's
`forward` is replaced by the chunked computation, so the model's own forward (and the
sharding hooks on it: FSDP2's root all-gather, ZeRO-3's per-module gathers) run as usual
and the head returns log-probs [B, L] in place of logits. Models that post-process logits
after the head (final logit soft-capping, a logit scale) always take the plain path.

With `train.kernels=liger` (CUDA only) the head instead runs Liger's fused linear
cross-entropy over the whole micro-batch (`_fused_head`): the same values and gradients
as the chunked path (tests/models/test_fast_paths.py, on GPU). The kernel gives no entropy:
when it is asked for (GRPO's policy loss), it is computed without gradient over chunks of
the logits budget, as the chunked path does. All of a role's log-probs (old, reference and
the loss's) thus come from the same kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from orchestrator.methods.base import unwrap
from orchestrator.models.kernels import uses_fused_ce

_NO_IGNORE = -100
"""An ignore index no token id (>= 0) equals: every input token is a target of token_logprobs."""
_POSTPROCESSED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def chunk_tokens(model: torch.nn.Module, budget_mb: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay under `budget_mb` MiB."""
    vocab = unwrap(model).get_output_embeddings().weight
    vocab_size = getattr(vocab, "ds_shape", vocab.shape)[0]
    return max(1, (budget_mb << 20) // (4 * vocab_size))


def _chunkable(model: torch.nn.Module) -> bool:
    cfg = unwrap(model).config
    return not any(getattr(cfg, k, None) for k in _POSTPROCESSED)


def _logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=-1)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def _chunk(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return _logp(F.linear(hidden, weight, bias), targets)


@contextlib.contextmanager
def _head_as(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """The LM head computes `forward(hidden)` in place of its logits for the duration."""
    head = unwrap(model).get_output_embeddings()
    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def _chunked_head(
    model: torch.nn.Module, targets: torch.Tensor, size: int, entropy: Optional[list]
) -> contextlib.AbstractContextManager:
    head = unwrap(model).get_output_embeddings()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        b, length = targets.shape
        flat_h = hidden[:, :-1].reshape(b * length, hidden.shape[-1])
        flat_t = targets.reshape(-1)
        parts = []
        for s in range(0, flat_t.numel(), size):
            h, t = flat_h[s : s + size], flat_t[s : s + size]
            parts.append(checkpoint(_chunk, h, t, head.weight, head.bias, use_reentrant=False))
            if entropy is not None:
                with torch.no_grad():
                    entropy.append(_entropy(F.linear(h, head.weight, head.bias)))
        logp = torch.cat(parts).view(b, length)
        return F.pad(logp, (0, 1))  # [B, L]: the model slices nothing off; the caller drops the last

    return _head_as(model, forward)


def _liger_fused_linear_ce() -> Callable[..., torch.Tensor]:
    """Liger's fused linear cross-entropy, imported on first use (an optional, CUDA-only package)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def _fused_head(
    model: torch.nn.Module, targets: torch.Tensor, ignore_index: int, size: int, entropy: Optional[list]
) -> contextlib.AbstractContextManager:
    """Liger's fused linear cross-entropy over all tokens in one call (it sizes its own token
    chunks); targets equal to `ignore_index` get 0. The entropy, if asked
    for, over chunks of `size` tokens without gradient."""
    fused_linear_ce = _liger_fused_linear_ce()
    head = unwrap(model).get_output_embeddings()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        b, length = targets.shape
        flat_h = hidden[:, :-1].reshape(b * length, hidden.shape[-1])
        nll = fused_linear_ce(
            flat_h, head.weight, targets.reshape(-1), head.bias, ignore_index=ignore_index, reduction="none"
        )
        if entropy is not None:
            with torch.no_grad():
                for s in range(0, flat_h.shape[0], size):
                    entropy.append(_entropy(F.linear(flat_h[s : s + size], head.weight, head.bias)))
        return F.pad(-nll.float().view(b, length), (0, 1))

    return _head_as(model, forward)


def _forward(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits


def _plain(model: torch.nn.Module, mb: dict[str, torch.Tensor], budget_mb: int, n_targets: int) -> bool:
    return n_targets <= chunk_tokens(model, budget_mb) or not _chunkable(model)


def _chunked(
    model: torch.nn.Module, mb: dict[str, torch.Tensor], targets: torch.Tensor, budget_mb: int, with_entropy: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    parts: Optional[list] = [] if with_entropy else None
    with _chunked_head(model, targets, chunk_tokens(model, budget_mb), parts):
        logp = _forward(model, mb)[:, :-1]
    ent = torch.cat(parts).view(targets.shape) if parts is not None else None
    return logp, ent


def _fused(
    model: torch.nn.Module,
    mb: dict[str, torch.Tensor],
    targets: torch.Tensor,
    ignore_index: int,
    budget_mb: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    parts: Optional[list] = [] if with_entropy else None
    with _fused_head(model, targets, ignore_index, chunk_tokens(model, budget_mb), parts):
        logp = _forward(model, mb)[:, :-1]
    ent = torch.cat(parts).view(targets.shape) if parts is not None else None
    return logp, ent


def _use_fused(model: torch.nn.Module) -> bool:
    # Logit post-processing (soft-capping, scales) is not applied by the fused kernel here.
    return uses_fused_ce(model) and _chunkable(model)


def token_logprobs(
    model: torch.nn.Module, mb: dict[str, torch.Tensor], budget_mb: int, with_entropy: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position t: [B, L-1] float32,
    and (with_entropy) the policy's entropy at each position (no gradient)."""
    targets = mb["input_ids"][:, 1:]
    if _use_fused(model):
        return _fused(model, mb, targets, _NO_IGNORE, budget_mb, with_entropy)
    if not _plain(model, mb, budget_mb, targets.numel()):
        return _chunked(model, mb, targets, budget_mb, with_entropy)
    logits = _forward(model, mb)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = _entropy(logits[:, :-1])
    return _logp(logits[:, :-1], targets), ent


def nll_sum(model: torch.nn.Module, mb: dict[str, torch.Tensor], budget_mb: int, ignore_index: int) -> torch.Tensor:
    """Summed next-token NLL of `mb["labels"][:, 1:]` (entries == ignore_index left out)."""
    labels = mb["labels"][:, 1:]
    if _use_fused(model):
        return -_fused(model, mb, labels, ignore_index, budget_mb, False)[0].sum()
    if not _plain(model, mb, budget_mb, labels.numel()):
        ignored = labels == ignore_index
        logp, _ = _chunked(model, mb, labels.masked_fill(ignored, 0), budget_mb, False)
        return -logp.masked_fill(ignored, 0.0).sum()
    logits = _forward(model, mb)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
