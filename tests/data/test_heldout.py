"""Held-out prompts: disjoint from training, deterministic, pinned (the pinned prompts are
those `GrpoStage._heldout` chose before it moved here)."""

from __future__ import annotations

import json

import pytest

from orchestrator.config.schema import DataConfig
from orchestrator.data.heldout import heldout_prompts
from orchestrator.data.prompts import load_prompts


def _keys(rows):
    return [json.dumps(p["messages"]) for p in rows]


@pytest.mark.parametrize(
    "source, first",
    [
        # a generator with a `_heldout` stream
        (
            "synthetic:arithmetic",
            [
                ("What is 14 + 2?", "16"),
                ("What is 74 + 6?", "80"),
                ("What is 23 + 7?", "30"),
            ],
        ),
        # no `_heldout` stream: a second stream minus the training prompts
        (
            "synthetic:arithmetic_noisy",
            [
                ("What is 25 + 1?", "26"),
                ("What is 32 + 2?", "34"),
                ("What is 12 + 6?", "18"),
            ],
        ),
    ],
)
def test_heldout_is_disjoint_deterministic_and_pinned(source, first):
    d = DataConfig(source=source, num_samples=300, seed=0)
    train = load_prompts(d)
    held = heldout_prompts(d, train, 40)
    assert len(held) == 40
    assert not set(_keys(held)) & set(_keys(train))
    assert len(set(_keys(held))) == len(held)
    assert heldout_prompts(d, train, 40) == held
    assert [(p["messages"][0]["content"], p["answer"]) for p in held[:3]] == first
    assert heldout_prompts(d, train, 10) == held[:10]


def test_no_heldout_for_files_or_zero_samples(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    d = DataConfig(source=str(path))
    assert heldout_prompts(d, load_prompts(d), 10) == []
    d = DataConfig(source="synthetic:arithmetic", num_samples=10)
    assert heldout_prompts(d, load_prompts(d), 0) == []
