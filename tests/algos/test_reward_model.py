"""Reward model: the Bradley-Terry loss and last-real-token pooling (left and right padding)
against hand computation and against unpadded single-sequence scores."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.algos.reward_model import bradley_terry_loss, last_token_index, pool_last, sequence_scores


def test_bradley_terry_loss_with_and_without_margin():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    assert bradley_terry_loss(c, r).tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(3))])
    assert bradley_terry_loss(c, r, 0.5).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(3.5))]
    )
    per_pair = torch.tensor([1.0, -1.0])
    assert bradley_terry_loss(c, r, per_pair)[0].item() == pytest.approx(math.log(2))  # 2 - 1 - 1 = 0


def test_last_token_pooling_left_and_right_padding():
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [1, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    scores = torch.arange(12.0).view(3, 4, 1)  # a head's per-token output [B, L, 1]
    assert pool_last(scores, right).tolist() == [1.0, 7.0, 8.0]
    assert pool_last(scores, left).tolist() == [3.0, 7.0, 11.0]


@pytest.fixture(scope="module")
def rm():
    from orchestrator.config.compose import compose
    from orchestrator.models import build_model

    cfg, _ = compose(["model=tiny_llama"])
    model = build_model(cfg.model, torch.float32, head="score").eval()
    model.score.weight.data.normal_(0, 1.0)  # a head that separates sequences
    return model


def _batch(seqs: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def test_sequence_scores_equal_unpadded_scores_for_left_and_right_padding(rm):
    pad = rm.config.pad_token_id
    seqs = [[5, 9, 17, 33, 4], [5, 60], [7, 8, 9]]
    alone = torch.stack([rm(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
    assert len(set(alone.tolist())) == 3
    for left in (False, True):
        ids, mask = _batch(seqs, pad, left)
        assert torch.allclose(sequence_scores(rm, ids, mask), alone, atol=1e-5), left
    # transformers pools at the last token that is not the pad id: the same on right padding
    ids, mask = _batch(seqs, pad, left=False)
    assert torch.allclose(rm(input_ids=ids, attention_mask=mask).logits[:, 0], alone, atol=1e-5)


@torch.no_grad()
def test_pooling_by_mask_survives_a_pad_id_that_is_also_eos(rm):
    eos = 4
    ids, mask = _batch([[5, 9, 17, eos], [5, 60, eos]], eos, left=False)  # pad token = EOS
    alone = torch.stack([rm(input_ids=ids[i : i + 1, : int(mask[i].sum())]).logits[0, 0] for i in range(2)])
    assert torch.allclose(sequence_scores(rm, ids, mask), alone, atol=1e-5)


def test_lora_reward_model_trains_its_head_and_exports_the_same_scores(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from orchestrator.config.compose import compose
    from orchestrator.methods.lora import Lora
    from orchestrator.models import build_model, build_tokenizer

    cfg, _ = compose(["model=tiny_llama", "method=lora"])
    method = Lora(cfg.method)
    model = method.apply_seeded(build_model(cfg.model, torch.float32, head="score"), 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".score." in n for n in trainable)  # a new head trains in full beside the adapters
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # as if trained
    model.eval()
    ids, mask = _batch([[5, 9, 17, 33], [5, 60]], 0, left=False)
    with torch.no_grad():
        want = sequence_scores(model, ids, mask)
    paths = method.export(model, tmp_path, build_tokenizer(cfg.model), None)
    base = AutoModelForSequenceClassification.from_pretrained(paths["base"])
    loaded = PeftModel.from_pretrained(base, paths["adapter"]).eval()
    with torch.no_grad():
        assert torch.allclose(sequence_scores(loaded, ids, mask), want, atol=1e-5)
