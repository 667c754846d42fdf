"""Token rows -> padded tensors: one home for every stage's collate.

* `pad_collate`: SFT-style rows (`input_ids`, optional `labels` and `position_ids`).
  Right padding (training) needs no attention mask: with causal attention real tokens
  never see the pads that follow them, and pads carry no loss. Pads get their own
  position run (0, 1, ...), so a packed row's `position_ids` stay a valid packing.
  Left padding (generation, scoring prompts of different lengths) also returns an
  `attention_mask`, because there real tokens come after the pads.
* `rl_collate`: policy-gradient rows (prompt + completion, a per-token weight, an
  advantage, optionally the rollout engine's log-probs); targets are the completion tokens.
* `paired_collate`: preference pairs; chosen rows first, then rejected rows, so the
  loss splits the batch in halves; `pair_index` says which pair a row belongs to.

Labels follow the `transformers` convention: aligned with `input_ids` (the loss shifts),
IGNORE (-100) where no loss is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orchestrator.data.chat import IGNORE


def pad_collate(rows: Sequence[dict[str, Any]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad rows to the longest. Missing `labels` default to the ids (every token a target),
    missing `position_ids` to 0..n-1. Returns `input_ids`, `labels`, `position_ids` [B, L]
    (long), plus `attention_mask` [B, L] (long, 0 on pads) for `side="left"`."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: expected 'right' or 'left'")
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    pos = torch.arange(length).repeat(len(rows), 1)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        real = slice(0, n) if side == "right" else slice(length - n, length)
        pads = slice(n, length) if side == "right" else slice(0, length - n)
        ids[b, real] = torch.tensor(r["input_ids"])
        labels[b, real] = torch.tensor(r.get("labels", r["input_ids"]))
        pos[b, real] = torch.tensor(r["position_ids"]) if "position_ids" in r else torch.arange(n)
        # pads form their own (ignored) sequence
        pos[b, pads] = torch.arange(length - n)
        mask[b, real] = 1
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if side == "left":
        out["attention_mask"] = mask
    return out


def rl_collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows `{"input_ids": prompt + completion, "prompt_len", "weight", "adv"}` ->
    `input_ids` [B, L] right-padded, `position_ids` [B, L] = 0..L-1, `weights` [B, L-1]
    (float32; target t predicts token t+1: the row's weight on the completion targets
    `prompt_len-1 .. n-2`, 0 elsewhere; [B, 1] of zeros when L == 1), `adv` [B, 1].
    Rows may carry `rollout_logp` (the rollout engine's log-prob of each completion token):
    when any does, `rollout_logp` [B, L-1] (float32) holds them on the same targets as
    `weights`, 0 elsewhere."""
    length = max(len(r["input_ids"]) for r in rows)
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    weights = torch.zeros(b, length - 1) if length > 1 else torch.zeros(b, 1)
    adv = torch.zeros(b, 1)
    rollout = torch.zeros_like(weights) if any("rollout_logp" in r for r in rows) else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        start = r["prompt_len"] - 1  # target index of the first completion token
        weights[i, start : n - 1] = r["weight"]
        adv[i, 0] = r["adv"]
        if rollout is not None and "rollout_logp" in r:
            rollout[i, start : n - 1] = torch.tensor(r["rollout_logp"], dtype=torch.float32)
    pos = torch.arange(length).repeat(b, 1)
    out = {"input_ids": ids, "position_ids": pos, "weights": weights, "adv": adv}
    if rollout is not None:
        out["rollout_logp"] = rollout
    return out


def rl_dummy(pad_id: int) -> dict[str, Any]:
    """An RL row with no targets, for ranks without data (see `batching.shard`)."""
    return {"input_ids": [pad_id], "prompt_len": 1, "weight": 0.0, "adv": 0.0}


def paired_collate(pairs: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs `{"prompt_ids", "chosen_ids", "rejected_ids"}` (as `tokenize_pairs` makes them)
    -> 2B right-padded rows, `prompt + chosen` for every pair, then `prompt + rejected`:
    `input_ids`, `labels` (IGNORE on the prompt and pads), `position_ids` [2B, L] and
    `pair_index` [2B] (row i and row B + i are pair i)."""
    rows = [
        {
            "input_ids": p["prompt_ids"] + p[key],
            "labels": [IGNORE] * len(p["prompt_ids"]) + p[key],
        }
        for key in ("chosen_ids", "rejected_ids")
        for p in pairs
    ]
    out = pad_collate(rows, pad_id)
    out["pair_index"] = torch.arange(len(pairs)).repeat(2)
    return out


def pair_dummy(pad_id: int) -> dict[str, list[int]]:
    """A pair with no targets, for ranks without data (see `batching.shard`)."""
    return {"prompt_ids": [pad_id], "chosen_ids": [], "rejected_ids": []}
