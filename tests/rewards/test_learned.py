"""The learned reward: scores of prompt + completion token ids sharded over ranks come back
in sample order and equal the reward model's own scores of each sequence alone; shaping
(normalise, clip) by hand; a reward model with another tokenizer is refused."""

from __future__ import annotations

import pytest
import torch

from orchestrator.algos.reward_model import sequence_scores
from orchestrator.config.schema import ModelConfig, RewardModelSpec
from orchestrator.errors import ConfigError
from orchestrator.models import build_model, build_tokenizer
from orchestrator.rewards.learned import LearnedReward, _check_same_tokenizer, reward_model_dir


class _ScoreGroup:
    """A frozen role's `forward_eval`, by a real model in-process."""

    def __init__(self, model, world: int):
        self.model, self.world_size = model, world

    def call_per_rank(self, method, per_rank, fn):
        assert method == "forward_eval" and len(per_rank) == self.world_size
        with torch.no_grad():
            return [[fn(self.model, mb) for mb in mbs] for mbs in per_rank]


@pytest.fixture(scope="module")
def rm():
    m = ModelConfig(name="tiny_llama", init_seed=7)
    return build_model(m, torch.float32, head="score").eval(), build_tokenizer(m)


def test_scores_come_back_in_sample_order_and_equal_scoring_alone(rm):
    model, tok = rm
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 250, (int(n),), generator=g).tolist() for n in (3, 7, 5)]
    comps = [torch.randint(5, 250, (int(n),), generator=g).tolist() for n in (4, 1, 9, 2, 6, 3)]
    sample_prompts = [prompts[i // 2] for i in range(6)]
    lr = LearnedReward(RewardModelSpec(path="x"), tok.pad_token_id, world=2, micro_batch_size=2)
    got = lr.raw(_ScoreGroup(model, 2), sample_prompts, comps)
    with torch.no_grad():
        alone = [
            sequence_scores(model, torch.tensor([p + c]), torch.ones(1, len(p) + len(c), dtype=torch.long)).item()
            for p, c in zip(sample_prompts, comps)
        ]
    assert got.tolist() == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 4) for x in alone)) == 6  # the sequences score differently


def test_shaping_by_hand():
    s = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert LearnedReward(RewardModelSpec(), 0, 1, 1).shape(s).tolist() == [1.0, 3.0, 5.0, 7.0]
    norm = LearnedReward(RewardModelSpec(normalize=True), 0, 1, 1).shape(s)
    std = (5.0) ** 0.5  # population std of 1, 3, 5, 7
    assert norm.tolist() == pytest.approx([-3 / std, -1 / std, 1 / std, 3 / std], abs=1e-6)
    clipped = LearnedReward(RewardModelSpec(normalize=True, clip=1.0), 0, 1, 1).shape(s)
    assert clipped.tolist() == pytest.approx([-1.0, -1 / std, 1 / std, 1.0], abs=1e-6)


def test_reward_model_path_must_hold_a_model(tmp_path):
    with pytest.raises(ConfigError, match=r"stage.reward_model.path=.*no model there"):
        reward_model_dir(str(tmp_path))


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, rm):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model, tok = rm
    other = tmp_path / "other"
    model.save_pretrained(other)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    fast.add_tokens(["<extra_token>"])
    fast.save_pretrained(other)
    assert len(AutoTokenizer.from_pretrained(other)) == len(tok) + 1
    policy = ModelConfig(name="tiny_llama")
    with pytest.raises(ConfigError, match="another tokenizer than the policy"):
        _check_same_tokenizer(policy, other)
    same = tmp_path / "same"
    model.save_pretrained(same)
    tok.save_pretrained(same)
    _check_same_tokenizer(policy, same)  # the same tokenizer passes
