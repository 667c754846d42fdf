"""The learned reward: a frozen `reward_model` role that scores rollouts.

A `{name: reward_model}` entry of `stage.rewards` (GRPO or PPO) scores each sample with the
reward model of `stage.reward_model.path` (a `stage=rm` export: a sequence-classification
model with one output). It runs as a frozen worker group colocated on the policy's bundles
(forwards only, `gpu_share` of a GPU), built like every other role, so it is rebuilt with
them by in-job recovery. It reads the token ids the policy generated (prompt + completion)
and pools at the last real token, as `stage=rm` trained it (orchestrator/algos/reward_model.py),
so the reward model must share the policy's tokenizer (checked when the role is declared).

Scores can be whitened over the step's samples (`normalize`) and clipped (`clip`) before
their weight is applied; verifiable rewards of the same list are added as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from orchestrator.algos.reward_model import sequence_scores
from orchestrator.config.schema import REWARD_MODEL
from orchestrator.data.batching import shard
from orchestrator.errors import ConfigError
from orchestrator.roles import RoleSpec

log = logging.getLogger("orchestrator")


def reward_model_dir(path: str) -> Path:
    """The model directory `stage.reward_model.path` names (a run directory's export, or a model)."""
    from orchestrator.chain import _model_dir

    found = _model_dir(Path(path).expanduser())
    if found is None:
        raise ConfigError(
            f"stage.reward_model.path={path!r}: no model there (expected a stage=rm run directory with an "
            "exported model, a model directory with config.json, or experiment:NAME)"
        )
    return found


def reward_model_spec(cfg: Any, policy: RoleSpec, gpu_share: float) -> RoleSpec:
    """The frozen reward-model role: the policy's layout, the reward model's weights, a score head."""
    from orchestrator.config.schema import FullMethodConfig
    from orchestrator.methods.full import Full

    path = reward_model_dir(cfg.stage.reward_model.path)
    _check_same_tokenizer(cfg.model, path)
    model = replace(cfg.model, pretrained=str(path), tokenizer=str(path), gguf_file=None)
    return replace(
        policy,
        name=REWARD_MODEL,
        model=model,
        method=FullMethodConfig(),
        method_cls=Full,
        train=None,
        loss=None,
        head="score",
        colocate_with=policy.name,
        gpu_share=gpu_share if cfg.cluster.gpus_per_worker else 0.0,
    )


def _check_same_tokenizer(policy_model: Any, rm_dir: Path) -> None:
    from orchestrator.models import build_tokenizer

    ours = build_tokenizer(policy_model)
    theirs = build_tokenizer(replace(policy_model, pretrained=str(rm_dir), tokenizer=str(rm_dir), gguf_file=None))
    if ours.get_vocab() != theirs.get_vocab():
        raise ConfigError(
            f"stage.reward_model.path: the reward model in {rm_dir} has another tokenizer than the policy "
            f"({len(theirs)} vs {len(ours)} tokens); it scores the policy's token ids, so train it from the "
            "same base model"
        )


def _collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([r["index"] for r in rows])}


def _scores(model: torch.nn.Module, mb: dict[str, Any]) -> torch.Tensor:
    return sequence_scores(model, mb["input_ids"], mb["attention_mask"])


class LearnedReward:
    """Scores samples on the `reward_model` worker group; shapes them per `stage.reward_model`."""

    def __init__(self, spec: Any, pad_id: int, world: int, micro_batch_size: int):
        self.spec = spec
        self.pad_id = pad_id
        self.world = world
        self.micro = micro_batch_size

    def raw(self, group: Any, prompt_ids: Sequence[list[int]], completions: Sequence[list[int]]) -> torch.Tensor:
        """[N] scores of prompt_ids[i] + completions[i] (one sequence per sample)."""
        rows = [{"input_ids": list(p) + list(c), "index": i} for i, (p, c) in enumerate(zip(prompt_ids, completions))]
        dummy = {"input_ids": [self.pad_id], "index": -1}
        per_rank = shard(rows, self.world, self.micro, self.pad_id, lambda rs: _collate(rs, self.pad_id), dummy)
        out = torch.zeros(len(rows))
        for mbs, scores in zip(per_rank, group.call_per_rank("forward_eval", per_rank, fn=_scores)):
            for mb, s in zip(mbs, scores):
                keep = mb["index"] >= 0
                out[mb["index"][keep]] = s[keep].float()
        return out

    def shape(self, scores: torch.Tensor) -> torch.Tensor:
        """Normalised (when `normalize`) and clipped (when `clip`) scores."""
        s = scores.double()
        if self.spec.normalize and len(s) > 1:
            s = (s - s.mean()) / (s.std(unbiased=False) + 1e-8)
        if self.spec.clip is not None:
            s = s.clamp(-self.spec.clip, self.spec.clip)
        return s.float()
