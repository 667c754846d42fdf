"""Held-out prompts: disjoint from training, deterministic, pinned (the pinned prompts are
those `GrpoStage._heldout` chose before it moved here); held-out conversations for NLL."""

from __future__ import annotations

import json

import pytest

from orchestrator.config.schema import DataConfig
from orchestrator.data.heldout import heldout_conversations, heldout_prompts
from orchestrator.data.prompts import load_prompts
from orchestrator.data.sources import load_rows
from orchestrator.data.synthetic import HELDOUT_STREAMS


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
        # the noisy variant's held-out stream is the same (HELDOUT_STREAMS)
        (
            "synthetic:arithmetic_noisy",
            [
                ("What is 14 + 2?", "16"),
                ("What is 74 + 6?", "80"),
                ("What is 23 + 7?", "30"),
            ],
        ),
    ],
)
def test_heldout_is_disjoint_deterministic_and_pinned(source, first):
    _check_heldout(source, first)


def test_without_a_heldout_stream_a_second_stream_minus_training(monkeypatch):
    monkeypatch.delitem(HELDOUT_STREAMS, "arithmetic_noisy")
    first = [("What is 25 + 1?", "26"), ("What is 32 + 2?", "34"), ("What is 12 + 6?", "18")]
    _check_heldout("synthetic:arithmetic_noisy", first)


def _check_heldout(source, first):
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


def test_heldout_conversations_come_from_the_same_stream_with_their_answers():
    d = DataConfig(source="synthetic:arithmetic_noisy", num_samples=300, seed=0)
    convs = heldout_conversations(d, 40)
    prompts = heldout_prompts(d, load_prompts(d), 40)
    assert [c[:-1] for c in convs] == [p["messages"] for p in prompts]
    assert [c[-1] for c in convs[:2]] == [
        {"role": "assistant", "content": "16"},
        {"role": "assistant", "content": "80"},
    ]
    d = DataConfig(source="synthetic:instruct", num_samples=200, seed=0)  # messages and prompt/completion rows
    train = {
        json.dumps(r.value.get("messages", [{"role": "user", "content": r.value.get("prompt")}])[:1])
        for r in load_rows(d)
    }
    held = heldout_conversations(d, 30)
    assert len(held) == 30 and all(c[-1]["role"] == "assistant" for c in held)
    assert not {json.dumps(c[:1]) for c in held} & train
