"""Bradley-Terry reward model: sequence scores and the pairwise loss.

A reward model is the causal LM with its vocabulary head replaced by one scalar output
(`transformers` `AutoModelForSequenceClassification`, `num_labels=1`); a sequence's score
is that output at its last real token. Trained on preference pairs with the Bradley-Terry
likelihood P(chosen > rejected) = sigmoid(r_c - r_r) (Bradley & Terry, 1952; as in
InstructGPT, Ouyang et al., arXiv:2203.02155), optionally with a margin m that the
chosen score must exceed the rejected one by (Llama 2, Touvron et al., arXiv:2307.09288):
loss = -log sigmoid(r_c - r_r - m).

Pooling reads the last position of the attention mask, not the last token that differs from
the pad id as `transformers` does: the two agree when no real token equals the pad id, but a
tokenizer whose pad token is its EOS (Llama 3, many chat models) would otherwise pool every
EOS-terminated sequence one token early; a config without a pad id would pool the last
position of a right-padded batch, a pad, and every score would be the same (50% accuracy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask, left- or right-padded -> [B] index of each row's last real token (0 if none)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def pool_last(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """token_scores [B, L] (or [B, L, 1]) -> [B] the score at each row's last real token."""
    if token_scores.dim() == 3:
        token_scores = token_scores.squeeze(-1)
    idx = last_token_index(attention_mask)
    return token_scores[torch.arange(len(idx), device=idx.device), idx]


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


@contextlib.contextmanager
def pooled_head(head: torch.nn.Module, attention_mask: torch.Tensor) -> Iterator[None]:
    """Inside, `head`'s per-token output [B, L, 1] is replaced by each row's score at its last
    real token, on every position: whichever position `transformers` then pools at, the
    model's own output is the mask-pooled score (and the sharding backends' backward hooks,
    which sit on the model's outputs, see the gradient)."""

    def hook(_module, _inputs, out):
        return pool_last(out, attention_mask)[:, None, None].expand_as(out)

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] scores of a sequence-classification model (possibly peft- or engine-wrapped) at each
    row's last real token; position ids count real tokens only, so a left-padded row scores as
    it does alone."""
    from orchestrator.methods.base import unwrap

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with pooled_head(unwrap(model).score, attention_mask):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.logits[:, 0]
