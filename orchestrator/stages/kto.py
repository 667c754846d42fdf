"""KTO (Ethayarajh et al., arXiv:2402.01306): preference tuning on unpaired examples.

Rows are `{"prompt", "completion", "label"}`, or pairs split into a desirable and an
undesirable example (`data/unpaired.py`). The loss is a pure function in
orchestrator/algos/preference.py. Each step:

1. take `train.global_batch_size` examples (resumable position) from the prepared examples
   (`data/kinds.py` kind `kto`: memory-mapped and read by index; in memory with `data.cache=false`);
2. KL reference point: pair each prompt with the completion of the previous example of the
   global batch (TRL rotates the same way within a device batch), so the mismatched
   completions are the batch's own; z0 = max(0, mean log-ratio policy/reference over them),
   computed by the driver with forward passes on the policy and the reference, detached
   (as in the paper and TRL) and shipped to every rank;
3. reference sums of the matched examples, also by the driver;
4. the loss is the mean over the examples of the global batch of the weighted per-example
   losses (TRL: the mean per micro-batch).

Deviation: the policy's log-probs of the mismatched pairs come from a no-grad forward in
eval mode (TRL: train mode); they differ only under dropout (e.g. LoRA dropout).
Held-out evaluation (stages/preference.py) scores pairs with the implicit reward beta *
log-ratio: accuracy and margin of chosen over rejected.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from orchestrator.algos.preference import PairBatch, kto_kl, kto_loss, sequence_logps
from orchestrator.config.checks import positive
from orchestrator.data.batching import shard
from orchestrator.data.chat import IGNORE
from orchestrator.data.collate import pad_collate
from orchestrator.data.preference import log_truncated
from orchestrator.errors import ConfigError
from orchestrator.models.logprobs import token_logprobs
from orchestrator.stages.base import step_metrics, train_on_workers
from orchestrator.stages.preference import PreferenceStage, require_rows_with

log = logging.getLogger("orchestrator")


def check_kto(s: Any, cfg: Any) -> None:
    """The rules of `stage=kto` (KtoStageConfig.check)."""
    positive(s.beta, "stage.beta")
    positive(s.desirable_weight, "stage.desirable_weight", allow_zero=True)
    positive(s.undesirable_weight, "stage.undesirable_weight", allow_zero=True)
    if not s.desirable_weight and not s.undesirable_weight:
        raise ConfigError("stage.desirable_weight and stage.undesirable_weight are both 0: nothing would train")
    if cfg.train.global_batch_size < 2:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size}: KTO estimates its KL term from mismatched "
            "prompt/completion pairs of the batch, so it needs at least 2 examples per step"
        )


def collate_examples(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples `{"prompt_ids", "completion_ids", "label"}` -> `pad_collate` rows (labels on
    the completion) plus `desirable` [B] (bool)."""
    mb = pad_collate(
        [
            {
                "input_ids": r["prompt_ids"] + r["completion_ids"],
                "labels": [IGNORE] * len(r["prompt_ids"]) + r["completion_ids"],
            }
            for r in rows
        ],
        pad_id,
    )
    mb["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
    return mb


def example_dummy(pad_id: int) -> dict[str, Any]:
    """An example with no targets, for ranks without data (see `batching.shard`)."""
    return {"prompt_ids": [pad_id], "completion_ids": [], "label": False}


def mismatched(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt i with the completion of example i-1 (cyclically): KTO's KL estimate samples."""
    return [dict(ex, completion_ids=batch[i - 1]["completion_ids"]) for i, ex in enumerate(batch)]


class KtoStage(PreferenceStage):
    @classmethod
    def data_kind(cls, cfg) -> tuple[str, dict[str, Any]]:
        """Unpaired examples (`data/kinds.py`)."""
        return "kto", {}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        require_rows_with(cfg.data, ("chosen", "label"), "kto")
        self.examples = examples = self.load_table(tokenizer)
        log_truncated(int(examples.values("truncated").sum()), len(examples), "examples", cfg.data)
        self.source = self.make_source(examples.lengths("prompt_ids") + examples.lengths("completion_ids"))
        s = cfg.stage
        self.ctx = {
            "beta": s.beta,
            "desirable_weight": s.desirable_weight,
            "undesirable_weight": s.undesirable_weight,
            "world_size": self.world,
            "logits_chunk_mb": cfg.train.logits_chunk_mb,
        }
        good = int(examples.values("label").astype(bool).sum())
        log.info("KTO: %d examples (%d desirable), %d per step", len(self.examples), good, cfg.train.global_batch_size)

    def shard_examples(self, examples: list[dict[str, Any]]):
        return shard(
            examples,
            self.world,
            self.cfg.train.micro_batch_size,
            self.pad,
            collate_fn=lambda rows: collate_examples(rows, self.pad),
            dummy=example_dummy(self.pad),
        )

    def kl(self, roles, examples: list[dict[str, Any]]) -> float:
        """z0 over the global batch's mismatched pairs (rows without targets left out)."""
        per_rank = self.shard_examples(mismatched(examples))
        counts = [(mb["labels"][:, 1:] != IGNORE).sum(-1) for mbs in per_rank for mb in mbs]
        policy = torch.cat([s for r in self.sums(roles, per_rank, reference=False) for s in r])
        ref = torch.cat([s for r in self.sums(roles, per_rank, reference=True) for s in r])
        keep = torch.cat(counts) > 0
        return float(kto_kl(policy[keep], ref[keep]))

    def step(self, roles, step: int) -> dict[str, Any]:
        t0 = time.time()
        examples = self.examples.gather([row["index"] for row in self.source.next()])
        kl = self.kl(roles, examples)
        per_rank = self.shard_examples(examples)
        self.attach_reference(roles, per_rank)
        ref_time = time.time() - t0
        ctx = dict(self.ctx, kl=kl, num_examples=len(examples))
        per_rank = [[dict(mb, **ctx) for mb in mbs] for mbs in per_rank]
        t = time.time()
        results = train_on_workers(roles.policy, per_rank, self.cfg.train.on_nonfinite, step)
        metrics = kto_step_metrics(results, len(examples))
        metrics.update(
            step_metrics(results),
            kl=kl,
            tokens=sum(len(ex["prompt_ids"]) + len(ex["completion_ids"]) for ex in examples),
            epoch=self.source.epoch,
            **{"time/reference": ref_time, "time/train": time.time() - t, "step_time": time.time() - t0},
        )
        metrics.update(self.maybe_evaluate(roles, step))
        return metrics

    def score_pairs(self, batch: PairBatch):
        return None, *batch.dpo_rewards(self.cfg.stage.beta)

    # ---------------------------------------------------------- worker side
    @staticmethod
    def loss(model: torch.nn.Module, mb: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, _ = token_logprobs(model, mb, mb["logits_chunk_mb"])
        sums, counts = sequence_logps(logp, mb["labels"])
        losses, rewards = kto_loss(
            sums,
            mb["ref_logps"],
            mb["desirable"],
            mb["kl"],
            mb["beta"],
            mb["desirable_weight"],
            mb["undesirable_weight"],
        )
        valid = counts > 0  # a rank without data gets an empty example
        loss_sum = (losses * valid).sum()
        good, bad = (valid & mb["desirable"]).float(), (valid & ~mb["desirable"]).float()
        with torch.no_grad():
            metrics = {
                "loss_sum": loss_sum.detach(),
                "desirable": good.sum(),
                "undesirable": bad.sum(),
                "rewards_chosen_sum": (rewards * good).sum(),
                "rewards_rejected_sum": (rewards * bad).sum(),
                "logps_chosen_sum": (sums * good).sum(),
                "logps_rejected_sum": (sums * bad).sum(),
            }
        return loss_sum / mb["num_examples"] * mb["world_size"], metrics


def kto_step_metrics(results: list[dict[str, float]], n: int) -> dict[str, float]:
    """Global-batch means of the summed worker metrics, under TRL's names."""
    keys = ("loss_sum", "desirable", "undesirable", "rewards_chosen_sum", "rewards_rejected_sum")
    total = {k: sum(r[k] for r in results) for k in (*keys, "logps_chosen_sum", "logps_rejected_sum")}
    good, bad = max(total["desirable"], 1.0), max(total["undesirable"], 1.0)
    out = {
        "loss": total["loss_sum"] / n,
        "rewards/chosen": total["rewards_chosen_sum"] / good,
        "rewards/rejected": total["rewards_rejected_sum"] / bad,
        "logps/chosen": total["logps_chosen_sum"] / good,
        "logps/rejected": total["logps_rejected_sum"] / bad,
        "desirable_fraction": total["desirable"] / n,
    }
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
