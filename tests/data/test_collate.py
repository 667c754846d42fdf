"""Collate functions: hand-made rows, exact tensors."""

from __future__ import annotations

import pytest
import torch

from orchestrator.data.batching import collate, shard
from orchestrator.data.chat import IGNORE
from orchestrator.data.collate import (
    pad_collate,
    pair_dummy,
    paired_collate,
    rl_collate,
    rl_dummy,
)

I = IGNORE  # noqa: E741 (reads as a mask in the tables below)


def _t(rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype)


def _equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), (k, got[k], want[k])


def test_pad_collate_right_keeps_packed_positions_and_ignores_pads():
    rows = [
        {
            "input_ids": [5, 6, 7, 8],
            "labels": [I, 6, I, 8],
            "position_ids": [0, 1, 0, 1],
        },
        {"input_ids": [9, 10], "labels": [I, 10], "position_ids": [0, 1]},
    ]
    want = {
        "input_ids": _t([[5, 6, 7, 8], [9, 10, 0, 0]]),
        "labels": _t([[I, 6, I, 8], [I, 10, I, I]]),
        "position_ids": _t([[0, 1, 0, 1], [0, 1, 0, 1]]),
    }
    _equal(pad_collate(rows, pad_id=0), want)
    _equal(collate(rows, 0), want)  # the old name is the same function


def test_pad_collate_left_adds_attention_mask_and_defaults():
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [9], "labels": [I]}]
    _equal(
        pad_collate(rows, pad_id=2, side="left"),
        {
            "input_ids": _t([[5, 6, 7], [2, 2, 9]]),
            "labels": _t([[5, 6, 7], [I, I, I]]),
            "position_ids": _t([[0, 1, 2], [0, 1, 0]]),
            "attention_mask": _t([[1, 1, 1], [0, 0, 1]]),
        },
    )
    with pytest.raises(ValueError, match="side="):
        pad_collate(rows, 0, side="middle")


def test_rl_collate_weights_cover_completion_targets():
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "prompt_len": 2, "weight": 0.5, "adv": 1.5},
        {"input_ids": [6, 7, 8], "prompt_len": 1, "weight": 0.25, "adv": -2.0},
    ]
    _equal(
        rl_collate(rows, pad_id=0),
        {
            "input_ids": _t([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]),
            "position_ids": _t([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]),
            # target t predicts token t+1: row 0's completion tokens 3, 4, 5 are targets 1..3
            "weights": _t([[0.0, 0.5, 0.5, 0.5], [0.25, 0.25, 0.0, 0.0]], torch.float32),
            "adv": _t([[1.5], [-2.0]], torch.float32),
        },
    )


def test_rl_collate_places_rollout_logprobs_on_the_completion_targets():
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "prompt_len": 2, "weight": 0.5, "adv": 1.5, "rollout_logp": [-0.5, -1.0, -2.0]},
        {"input_ids": [6, 7, 8], "prompt_len": 1, "weight": 0.25, "adv": -2.0, "rollout_logp": [-0.25, -4.0]},
        rl_dummy(0),  # a padding row has none: zeros, like its weights
    ]
    out = rl_collate(rows, pad_id=0)
    assert out["rollout_logp"].dtype == torch.float32
    assert out["rollout_logp"].tolist() == [[0.0, -0.5, -1.0, -2.0], [-0.25, -4.0, 0.0, 0.0], [0.0] * 4]
    assert ((out["rollout_logp"] != 0) == (out["weights"] > 0)).all()
    assert "rollout_logp" not in rl_collate(rows[2:], pad_id=0)


def test_rl_collate_single_token_rows_and_dummy():
    _equal(
        rl_collate([rl_dummy(3)], pad_id=3),
        {
            "input_ids": _t([[3]]),
            "position_ids": _t([[0]]),
            "weights": _t([[0.0]], torch.float32),
            "adv": _t([[0.0]], torch.float32),
        },
    )


def test_paired_collate_chosen_first_prompt_masked():
    pairs = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
    ]
    _equal(
        paired_collate(pairs, pad_id=0),
        {
            "input_ids": _t([[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 5], [6, 10, 0, 0]]),
            "labels": _t([[I, I, 3, I], [I, 7, 8, 9], [I, I, 4, 5], [I, 10, I, I]]),
            "position_ids": _t([[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]),
            "pair_index": _t([0, 1, 0, 1]),
        },
    )


def test_shard_with_rl_and_pair_dummies_gives_equal_counts():
    rows = [{"input_ids": [1, 2, 3], "prompt_len": 2, "weight": 1.0, "adv": 1.0}] * 3
    per_rank = shard(
        rows,
        world=2,
        micro=1,
        pad_id=0,
        collate_fn=lambda rs: rl_collate(rs, 0),
        dummy=rl_dummy(0),
    )
    assert [len(r) for r in per_rank] == [2, 2]
    assert per_rank[1][1]["weights"].sum() == 0
    pairs = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}] * 3
    per_rank = shard(
        pairs,
        world=2,
        micro=1,
        pad_id=0,
        collate_fn=lambda ps: paired_collate(ps, 0),
        dummy=pair_dummy(0),
    )
    assert [len(r) for r in per_rank] == [2, 2]
    assert (per_rank[1][1]["labels"] == IGNORE).all() and per_rank[1][1]["input_ids"].shape == (2, 1)
