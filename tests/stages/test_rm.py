"""The reward-model stage on the driver: its role has a score head, micro-batches carry the
attention mask and which pairs are real, the worker loss is the mean Bradley-Terry loss of
the global batch, and a bad margin is a config error."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.algos.reward_model import bradley_terry_loss, sequence_scores
from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.data.collate import pair_dummy
from orchestrator.errors import ConfigError
from orchestrator.models import build_model, build_tokenizer
from orchestrator.stages import STAGES

BASE = ["stage=rm", "debug=cpu", "data.num_samples=16", "eval.samples=4", "data.cache=false"]


@pytest.fixture(scope="module")
def stage():
    cfg, _ = compose(BASE)
    validate(cfg)
    return STAGES["rm"](cfg, build_tokenizer(cfg.model))


def test_role_collate_and_loss(stage):
    assert stage.roles()["policy"].head == "score" and stage.heldout_prompts == []
    assert len(stage.heldout) == 4
    pairs = [dict(p, index=i) for i, p in enumerate(stage.pairs.gather([0, 1]))] + [pair_dummy(stage.pad)]
    mb = stage.collate(pairs)
    lengths = [len(p["prompt_ids"]) + len(p[k]) for k in ("chosen_ids", "rejected_ids") for p in pairs]
    assert mb["attention_mask"].sum(1).tolist() == lengths
    assert mb["pair_valid"].tolist() == [1.0, 1.0, 0.0]

    model = build_model(stage.cfg.model, torch.float32, head="score")
    model.score.weight.data.normal_(0, 1.0)
    mb.update(margin=0.5, num_pairs=2, world_size=1)
    loss, metrics = type(stage).loss(model, mb)
    with torch.no_grad():
        s = sequence_scores(model, mb["input_ids"], mb["attention_mask"])
    c, r = s[:3], s[3:]
    want = bradley_terry_loss(c[:2], r[:2], 0.5).mean()  # the dummy pair counts for nothing
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["pairs"].item() == 2
    assert metrics["accuracy_sum"].item() == float((c[:2] > r[:2]).sum())
    assert metrics["chosen_sum"].item() == pytest.approx(float(c[:2].sum()), rel=1e-5)
    assert math.isfinite(metrics["chosen_sq_sum"].item())


def test_negative_margin_is_a_config_error():
    cfg, _ = compose([*BASE, "stage.margin=-1"])
    with pytest.raises(ConfigError, match=r"stage.margin=-1.0 must be >= 0"):
        validate(cfg)
