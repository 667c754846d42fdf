"""Reward model end to end on the session's Ray cluster (2 workers over gloo, tiny model,
generated review pairs): held-out pairwise accuracy goes from chance to >= 0.90, and the
exported model, loaded with `AutoModelForSequenceClassification`, gives the scores training
measured (transformers' own pooling included)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def _heldout_batch(tokenizer):
    from orchestrator.config.compose import compose
    from orchestrator.data.preference import tokenize_pairs
    from orchestrator.stages.preference import heldout_rows

    cfg, _ = compose(["stage=rm", "debug=cpu"])
    pairs = tokenize_pairs(heldout_rows(cfg.data, cfg.eval.samples), tokenizer, cfg.data)
    seqs = [p["prompt_ids"] + p[k] for k in ("chosen_ids", "rejected_ids") for p in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask, len(pairs)


def test_reward_model_learns_held_out_preferences_and_exports(run_main):
    rc, run_dir = run_main("stage=rm", "debug=cpu", "eval.every_steps=0")
    assert rc == 0
    steps = read_metrics(run_dir)
    assert len(steps) == 50
    for key in ("loss", "accuracy", "rewards/chosen_mean", "rewards/chosen_std", "rewards/rejected_mean"):
        assert key in steps[0], key
    assert sum(m["loss"] for m in steps[-5:]) < sum(m["loss"] for m in steps[:5])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.35 <= summary["eval_before/accuracy"] <= 0.65  # a random head: chance
    assert summary["eval_after/accuracy"] >= 0.90, summary

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.algos.reward_model import sequence_scores

    path = summary["exports"]["model"]
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    ids, mask, n = _heldout_batch(tokenizer)
    with torch.no_grad():
        ours = sequence_scores(model, ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # transformers' pooling
    assert torch.allclose(ours, theirs, atol=1e-4)
    chosen, rejected = ours[:n], ours[n:]
    assert (chosen > rejected).float().mean().item() == pytest.approx(summary["eval_after/accuracy"])
    assert chosen.mean().item() == pytest.approx(summary["eval_after/rewards/chosen_mean"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(summary["eval_after/rewards/rejected_mean"], abs=1e-4)
