"""Reward-model stage: a Bradley-Terry reward model on {prompt, chosen, rejected} pairs.

The model is the run's causal LM with a one-output score head (`RoleSpec.head="score"`:
`AutoModelForSequenceClassification`, `num_labels=1`, built by the same model-build path
and methods as every other role, so LoRA/QLoRA/full and both backends apply). The loss and
the last-real-token pooling are in orchestrator/algos/reward_model.py. The pipeline:

1. take `train.global_batch_size` pairs (resumable position) from the same prepared pairs as
   DPO (`data/kinds.py` kind `pairs`); chosen and rejected rows of a micro-batch go through
   the model in one forward (`paired_collate`, plus their attention mask);
2. loss: the mean over the global batch's pairs of -log sigmoid(r_c - r_r - stage.margin);
3. metrics, per step (train pairs) and on the generated source's held-out pairs (before
   training, every `eval.every_steps`, after): pairwise accuracy, loss, and the mean and std
   of the chosen and rejected scores.

The export (`checkpoint.export_hf`) is a sequence-classification model with the tokenizer's
pad id in its config: `AutoModelForSequenceClassification.from_pretrained` scores batches
the same as training did (for LoRA, the adapter carries the trained head in
`modules_to_save`; `method.export_merged=true` also writes a plain merged model).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np
import torch

from orchestrator.algos.reward_model import bradley_terry_loss, sequence_scores
from orchestrator.config.checks import positive
from orchestrator.data.preference import log_truncated
from orchestrator.roles import RoleSpec, policy_spec
from orchestrator.stages.base import step_metrics, train_on_workers
from orchestrator.stages.preference import PreferenceStage, pair_tokens, require_rows_with

log = logging.getLogger("orchestrator")

SCORE_HEAD = "score"


def check_rm(s: Any, cfg: Any) -> None:
    """The rules of `stage=rm` (RmStageConfig.check)."""
    positive(s.margin, "stage.margin", allow_zero=True)


class RmStage(PreferenceStage):
    reference_free = True

    @classmethod
    def data_kind(cls, cfg) -> tuple[str, dict[str, Any]]:
        """Preference pairs (`data/kinds.py`), as DPO reads them."""
        return "pairs", {}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.heldout_prompts = []  # a reward model does not generate: no exact-match evaluation
        require_rows_with(cfg.data, ("chosen",), "rm")
        self.pairs = pairs = self.load_table(tokenizer)
        log_truncated(int(pairs.values("truncated").sum()), len(pairs), "pairs", cfg.data)
        longest = pairs.lengths("prompt_ids") + np.maximum(pairs.lengths("chosen_ids"), pairs.lengths("rejected_ids"))
        self.source = self.make_source(longest)
        self.ctx = {"margin": float(cfg.stage.margin), "world_size": self.world}
        log.info(
            "reward model: %d pairs, %d per step, %d held out for eval",
            len(pairs),
            cfg.train.global_batch_size,
            len(self.heldout),
        )

    def roles(self) -> dict[str, RoleSpec]:
        """One trained role: the causal LM with a scalar score head."""
        return {"policy": replace(policy_spec(self.cfg, loss=RmStage.loss), head=SCORE_HEAD)}

    def collate(self, pairs: list[dict[str, Any]], cache: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The paired rows with their attention mask [2B, L] and which pairs are real [B]."""
        mb = super().collate(pairs)
        lengths = [len(p["prompt_ids"]) + len(p[k]) for k in ("chosen_ids", "rejected_ids") for p in pairs]
        width = mb["input_ids"].shape[1]
        mb["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        mb["pair_valid"] = torch.tensor([float(bool(p["chosen_ids"]) and bool(p["rejected_ids"])) for p in pairs])
        return mb

    def step(self, roles, step: int) -> dict[str, Any]:
        t0 = time.time()
        index = [row["index"] for row in self.source.next()]
        pairs = [dict(p, index=i) for i, p in zip(index, self.pairs.gather(index))]
        ctx = dict(self.ctx, num_pairs=len(pairs))
        per_rank = [[dict(mb, **ctx) for mb in mbs] for mbs in self.shard_pairs(pairs)]
        t = time.time()
        results = train_on_workers(roles.policy, per_rank, self.cfg.train.on_nonfinite, step)
        total = {k: sum(r[k] for r in results) for k in results[0] if k.endswith("_sum") or k == "pairs"}
        metrics = score_metrics(total)
        metrics.update(
            step_metrics(results),
            tokens=pair_tokens(pairs),
            epoch=self.source.epoch,
            **{"time/train": time.time() - t, "step_time": time.time() - t0},
        )
        metrics.update(self.maybe_evaluate(roles, step))
        return metrics

    # ------------------------------------------------------------- evaluation
    def pair_scores(self, roles, pairs: list[dict[str, Any]]) -> torch.Tensor:
        """[len(pairs), 2] scores (chosen, rejected) under the current model, in `pairs` order."""
        per_rank = self.shard_pairs([dict(p, index=i) for i, p in enumerate(pairs)])
        out = torch.zeros(len(pairs), 2)
        for mbs, scores in zip(per_rank, roles.policy.call_per_rank("forward_eval", per_rank, fn=RmStage.scores)):
            for mb, s in zip(mbs, scores):
                b = len(mb["index"])
                for j, i in enumerate(mb["index"].tolist()):
                    if i >= 0:
                        out[i] = torch.stack([s[j], s[b + j]])
        return out

    def evaluate(self, roles) -> dict[str, float]:
        """Held-out pairwise accuracy, loss and score statistics (`eval/...`)."""
        if not self.heldout:
            return {}
        s = self.pair_scores(roles, self.heldout).double()
        c, r = s[:, 0], s[:, 1]
        total = {
            "pairs": float(len(s)),
            "loss_sum": float(bradley_terry_loss(c, r, self.ctx["margin"]).sum()),
            "accuracy_sum": float((c > r).sum()),
            "chosen_sum": float(c.sum()),
            "chosen_sq_sum": float((c * c).sum()),
            "rejected_sum": float(r.sum()),
            "rejected_sq_sum": float((r * r).sum()),
        }
        return {f"eval/{k}": v for k, v in score_metrics(total).items()}

    # ---------------------------------------------------------- worker side
    @staticmethod
    def scores(model: torch.nn.Module, mb: dict[str, Any]) -> torch.Tensor:
        """[2B] scores of a micro-batch's rows (chosen rows, then rejected)."""
        return sequence_scores(model, mb["input_ids"], mb["attention_mask"])

    @staticmethod
    def loss(model: torch.nn.Module, mb: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = RmStage.scores(model, mb).float()
        b = len(s) // 2
        chosen, rejected, valid = s[:b], s[b:], mb["pair_valid"]
        losses = bradley_terry_loss(chosen, rejected, mb["margin"])
        loss_sum = (losses * valid).sum()
        with torch.no_grad():
            c, r = chosen.detach() * valid, rejected.detach() * valid
            metrics = {
                "loss_sum": loss_sum.detach(),
                "pairs": valid.sum(),
                "accuracy_sum": ((chosen > rejected).float() * valid).sum(),
                "chosen_sum": c.sum(),
                "chosen_sq_sum": (c * c).sum(),
                "rejected_sum": r.sum(),
                "rejected_sq_sum": (r * r).sum(),
            }
        return loss_sum / mb["num_pairs"] * mb["world_size"], metrics


def score_metrics(total: dict[str, float]) -> dict[str, float]:
    """Means of summed pair metrics: loss, accuracy, mean/std of chosen and rejected scores."""
    n = max(total["pairs"], 1.0)
    out = {"loss": total["loss_sum"] / n, "accuracy": total["accuracy_sum"] / n}
    for k in ("chosen", "rejected"):
        mean = total[f"{k}_sum"] / n
        out[f"rewards/{k}_mean"] = mean
        out[f"rewards/{k}_std"] = math.sqrt(max(total[f"{k}_sq_sum"] / n - mean * mean, 0.0))
    out["rewards/margins"] = out["rewards/chosen_mean"] - out["rewards/rejected_mean"]
    return out
