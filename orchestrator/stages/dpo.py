"""DPO and its variants: pairwise preference tuning on {prompt, chosen, rejected} rows.

The losses (DPO, cDPO, IPO, hinge, robust, SimPO, ORPO; with the papers and where they
deviate) are pure functions in orchestrator/algos/preference.py. This module is the
pipeline:

1. take `train.global_batch_size` pairs (resumable position) from the prepared pairs
   (`data/kinds.py` kind `pairs`: memory-mapped and read by index; in memory with
   `data.cache=false`); `train.micro_batch_size` counts pairs per forward;
2. chosen and rejected of a micro-batch go through the model in one concatenated forward
   (`paired_collate`: chosen rows, then rejected rows); log-probs come from
   `models.logprobs.token_logprobs` and are summed over completion tokens;
3. reference sums (for losses that have a reference) are computed by the driver before the
   update and shipped in the micro-batch, or read from the once-computed store
   (`stage.precompute_ref`); see `stages/preference.py`;
4. the loss of a step is the mean over the pairs of the global batch (plus `sft_weight`, or
   ORPO's own weight 1, times the NLL averaged over the chosen completion tokens of the
   global batch), so it does not depend on the split over ranks and micro-batches; TRL
   averages per micro-batch.

Metrics are named as TRL names them: `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (means of the
sequence log-prob sums; of the per-token means for SimPO and ORPO, as TRL's CPO and ORPO).
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from orchestrator.algos.preference import PREFERENCE_LOSSES, PairBatch, PreferenceLoss, sequence_logps
from orchestrator.config.checks import positive
from orchestrator.data.preference import log_truncated
from orchestrator.errors import ConfigError
from orchestrator.models.logprobs import token_logprobs
from orchestrator.stages.base import step_metrics, train_on_workers
from orchestrator.stages.preference import PreferenceStage, pair_tokens, require_rows_with

log = logging.getLogger("orchestrator")


def check_dpo(s: Any, cfg: Any) -> None:
    """The rules of `stage=dpo` (DpoStageConfig.check)."""
    spec = PREFERENCE_LOSSES[str(s.loss)]
    positive(s.beta, "stage.beta")
    positive(s.sft_weight, "stage.sft_weight", allow_zero=True)
    if not 0 <= s.label_smoothing < 0.5:
        raise ConfigError(f"stage.label_smoothing={s.label_smoothing} must be in [0, 0.5)")
    if s.label_smoothing and not spec.uses_label_smoothing:
        users = ", ".join(n for n, p in PREFERENCE_LOSSES.items() if p.uses_label_smoothing)
        raise ConfigError(
            f"stage.label_smoothing={s.label_smoothing} has no effect with stage.loss={spec.name}; "
            f"it is used by {users}. Set it to 0 or pick one of those losses."
        )
    default_gamma = next(f.default for f in fields(s) if f.name == "gamma")
    if s.gamma != default_gamma and spec.name != "simpo":
        raise ConfigError(f"stage.gamma={s.gamma} is SimPO's target margin; set stage.loss=simpo or drop it")
    if s.sft_weight and spec.nll_weight:
        raise ConfigError(
            f"stage.sft_weight={s.sft_weight}: stage.loss={spec.name} already contains the NLL of the chosen "
            "completions (weight 1); scale its preference term with stage.beta instead"
        )
    if s.precompute_ref and spec.is_reference_free:
        raise ConfigError(
            f"stage.precompute_ref=true: stage.loss={spec.name} is reference-free, there is nothing to precompute"
        )


class DpoStage(PreferenceStage):
    @classmethod
    def data_kind(cls, cfg) -> tuple[str, dict[str, Any]]:
        """Preference pairs (`data/kinds.py`)."""
        return "pairs", {}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        s = cfg.stage
        self.spec: PreferenceLoss = PREFERENCE_LOSSES[str(s.loss)]
        self.reference_free = self.spec.is_reference_free
        self.precompute = s.precompute_ref
        require_rows_with(cfg.data, ("chosen",), "dpo")
        self.pairs = pairs = self.load_table(tokenizer)
        log_truncated(int(pairs.values("truncated").sum()), len(pairs), "pairs", cfg.data)
        longest = pairs.lengths("prompt_ids") + np.maximum(pairs.lengths("chosen_ids"), pairs.lengths("rejected_ids"))
        self.source = self.make_source(longest)
        self.ctx = {
            "loss_type": self.spec.name,
            "beta": s.beta,
            "label_smoothing": s.label_smoothing,
            "gamma": s.gamma,
            "nll_weight": self.spec.nll_weight + s.sft_weight,
            "world_size": self.world,
            "logits_chunk_mb": cfg.train.logits_chunk_mb,
        }
        log.info(
            "DPO (%s%s): %d pairs, %d per step, %d held out for eval",
            self.spec.name,
            ", reference-free" if self.reference_free else "",
            len(pairs),
            cfg.train.global_batch_size,
            len(self.heldout),
        )

    def setup(self, roles, start_step: int, tracker) -> None:
        if self.precompute:
            self.precompute_reference(roles, start_step, self.pairs)
        super().setup(roles, start_step, tracker)

    def step(self, roles, step: int) -> dict[str, Any]:
        t0 = time.time()
        index = [row["index"] for row in self.source.next()]
        pairs = [dict(p, index=i) for i, p in zip(index, self.pairs.gather(index))]
        per_rank = self.shard_pairs(pairs, self.ref_cache.get("train"))
        t = time.time()
        if not self.reference_free and "train" not in self.ref_cache:
            self.attach_reference(roles, per_rank)
        ref_time = time.time() - t
        ctx = dict(
            self.ctx,
            num_pairs=len(pairs),
            num_chosen_tokens=max(1, sum(len(p["chosen_ids"]) for p in pairs)),
        )
        per_rank = [[dict(mb, **ctx) for mb in mbs] for mbs in per_rank]
        t = time.time()
        results = train_on_workers(roles.policy, per_rank, self.cfg.train.on_nonfinite, step)
        metrics = pair_step_metrics(results, ctx, self.spec)
        metrics.update(
            step_metrics(results),
            tokens=pair_tokens(pairs),
            epoch=self.source.epoch,
            **{"time/reference": ref_time, "time/train": time.time() - t, "step_time": time.time() - t0},
        )
        metrics.update(self.maybe_evaluate(roles, step))
        return metrics

    def score_pairs(self, batch: PairBatch):
        return self.spec(batch, self.cfg.stage.beta, self.cfg.stage.label_smoothing, self.cfg.stage.gamma)

    # ---------------------------------------------------------- worker side
    @staticmethod
    def loss(model: torch.nn.Module, mb: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, _ = token_logprobs(model, mb, mb["logits_chunk_mb"])
        sums, counts = sequence_logps(logp, mb["labels"])
        # The empty pair of a rank without data: a finite stand-in (ORPO's log(1 - p) is -inf at
        # log p = 0), masked out below; its gradient is zero either way.
        sums = torch.where(counts > 0, sums, torch.full_like(sums, -1.0))
        b = len(sums) // 2
        ref = mb.get("ref_logps")
        batch = PairBatch(
            sums[:b],
            sums[b:],
            counts[:b],
            counts[b:],
            None if ref is None else ref[:b],
            None if ref is None else ref[b:],
        )
        spec = PREFERENCE_LOSSES[mb["loss_type"]]
        losses, chosen, rejected = spec(batch, mb["beta"], mb["label_smoothing"], mb["gamma"])
        valid = (counts[:b] > 0).float()  # a rank without data gets an empty pair
        pref_sum = (losses * valid).sum()
        nll_sum = -(sums[:b] * valid).sum()
        loss = pref_sum / mb["num_pairs"] + mb["nll_weight"] * nll_sum / mb["num_chosen_tokens"]
        logps = batch.avg() if spec.length_normalized else (batch.chosen, batch.rejected)
        with torch.no_grad():
            metrics = {
                "pref_loss_sum": pref_sum.detach(),
                "nll_sum": nll_sum.detach(),
                "pairs": valid.sum(),
                "rewards_chosen_sum": (chosen * valid).sum(),
                "rewards_rejected_sum": (rejected * valid).sum(),
                "accuracies_sum": ((chosen > rejected).float() * valid).sum(),
                "logps_chosen_sum": (logps[0] * valid).sum(),
                "logps_rejected_sum": (logps[1] * valid).sum(),
            }
        return loss * mb["world_size"], metrics


def pair_step_metrics(results: list[dict[str, float]], ctx: dict[str, Any], spec: PreferenceLoss) -> dict[str, float]:
    """Global-batch means of the summed worker metrics, under TRL's names."""
    total = {k: sum(r[k] for r in results) for k in results[0] if k.endswith("_sum") or k == "pairs"}
    n = max(total["pairs"], 1.0)
    out = {
        "loss": total["pref_loss_sum"] / n + ctx["nll_weight"] * total["nll_sum"] / ctx["num_chosen_tokens"],
        "rewards/chosen": total["rewards_chosen_sum"] / n,
        "rewards/rejected": total["rewards_rejected_sum"] / n,
        "rewards/accuracies": total["accuracies_sum"] / n,
        "rewards/margins": (total["rewards_chosen_sum"] - total["rewards_rejected_sum"]) / n,
        "logps/chosen": total["logps_chosen_sum"] / n,
        "logps/rejected": total["logps_rejected_sum"] / n,
    }
    if ctx["nll_weight"]:
        out["nll"] = total["nll_sum"] / ctx["num_chosen_tokens"]
        out["pref_loss"] = total["pref_loss_sum"] / n
    return out
