"""What the preference stages (`dpo`, `kto`) share on the driver: roles, reference
log-probs, the data position and held-out evaluation.

* Roles: the policy, plus a frozen `reference` copy when the objective needs a reference
  the method cannot give by switching its trained weights off (`method=full`), unless the
  reference log-probs are precomputed. Reference-free objectives (SimPO, ORPO) build none.
* Reference log-probs are per-sequence sums over completion tokens, computed by the driver
  before each update (`forward_logprobs` on the reference: LoRA adapters off on the policy's
  own workers, or the frozen copy) and shipped in the micro-batches, as GRPO does; or, with
  `precompute_ref`, once for every pair before training, kept in `<run dir>/reference_logps.pt`
  and reused on resume, so that training runs with no second model in memory.
* Held-out evaluation (generated sources: the generator's `_heldout` stream, disjoint from
  training): preference accuracy and margins of the implicit reward on `eval.samples` pairs,
  and greedy exact match on their prompts through a rollout engine colocated with the
  policy; before training, every `eval.every_steps` steps and at the end.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from orchestrator.algos.preference import PairBatch, sequence_logps
from orchestrator.data.batching import BatchSource, shard
from orchestrator.data.collate import pair_dummy, paired_collate
from orchestrator.data.preference import tokenize_pairs
from orchestrator.data.prepare import load_examples
from orchestrator.data.prompts import prompt_rows
from orchestrator.data.sources import load_rows
from orchestrator.data.synthetic import GENERATORS
from orchestrator.data.table import RowView, as_table
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.evaluation import greedy_accuracy
from orchestrator.methods import METHODS, Reference
from orchestrator.roles import REFERENCE, RoleSpec, policy_spec
from orchestrator.rollout.base import COLOCATED_GPU_SHARE
from orchestrator.stages.base import Stage

log = logging.getLogger("orchestrator")

REFERENCE_GPU_SHARE = 0.1
"""Share of a policy bundle's GPU a colocated frozen reference copy takes (forwards only)."""
REFERENCE_FILE = "reference_logps.pt"
PRECOMPUTE_CHUNK = 4096
"""Pairs read from the table per pass of the once-computed reference log-probs."""


def heldout_rows(d, n: int) -> list[Any]:
    """`n` raw rows of a generated source's `<generator>_heldout` stream (none of its training
    problems); [] for files, hub sets and generators without one."""
    name = d.source.split(":", 1)[1] if d.source.startswith("synthetic:") else ""
    if not n or f"{name}_heldout" not in GENERATORS:
        return []
    return load_rows(replace(d, source=f"synthetic:{name}_heldout", num_samples=n, seed=d.seed + 10_000))


def require_rows_with(d, keys: tuple[str, ...], stage: str) -> None:
    """A generator that writes no row of this shape is a config mistake, not bad rows
    (checked on the generator's first row, before any preparation)."""
    if not d.source.startswith("synthetic:"):
        return
    rows = load_rows(replace(d, num_samples=1))
    if rows and not any(k in rows[0].value for k in keys):
        raise ConfigError(
            f"data.source={d.source!r} has no preference rows for stage={stage} (no {' / '.join(keys)}); "
            "use data=arithmetic_pairs (generated) or a .jsonl / .parquet / hf: set with prompt, chosen, rejected"
        )


class IndexRows(RowView):
    """Rows that are example indices (`{"index": i}`), with each example's length."""

    def __init__(self, lengths: Any):
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def row(self, r: int) -> dict[str, Any]:
        return {"index": int(r)}


class PreferenceStage(Stage):
    """Driver side shared by DPO and KTO; subclasses define the data, step and loss."""

    reference_free = False
    precompute = False

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.world, self.pad = cfg.cluster.num_workers, tokenizer.pad_token_id
        self.source: Optional[BatchSource] = None
        self.rollout = None
        self.eval_results: dict[str, float] = {}
        self._roles = None
        self.ref_cache: dict[str, torch.Tensor] = {}
        """Precomputed reference sums: "train" [N, 2] by pair index, "heldout" [M, 2]."""
        held = heldout_rows(cfg.data, cfg.eval.samples)
        self.heldout = tokenize_pairs(held, tokenizer, cfg.data) if held else []
        self.heldout_prompts = prompt_rows(held, cfg.data) if held and "answer" in held[0].value else []

    def load_table(self, tokenizer) -> Any:
        """The stage's examples (`data_kind`), prepared (`data.cache`) or in memory, as a table
        read by index (`data/table.py`): the driver holds no list of them."""
        d = self.cfg.data
        kind, opts = self.data_kind(self.cfg)
        return as_table(load_examples(d, kind, opts, tokenizer))

    def make_source(self, lengths: Any) -> BatchSource:
        """Resumable batches of example indices (`index`); `lengths` (of an example's longest
        row) group examples of similar length into a batch (`data.group_by_length`)."""
        d = self.cfg.data
        rows = IndexRows(lengths)
        return BatchSource(
            rows, "padded", 1 << 30, self.cfg.train.global_batch_size, d.seed, d.shuffle, d.group_by_length
        )

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or t.epochs * self.source.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["data"])

    # ------------------------------------------------------------------ roles
    @property
    def frozen_copy_method(self) -> bool:
        """The policy's method has no reference inside it (every weight trains)."""
        return METHODS[self.cfg.method.name](self.cfg.method).reference is Reference.FROZEN_COPY

    def roles(self) -> dict[str, RoleSpec]:
        cfg = self.cfg
        frozen = not self.reference_free and not self.precompute and self.frozen_copy_method
        gpus = cfg.cluster.gpus_per_worker > 0
        share = 1.0 - (REFERENCE_GPU_SHARE if frozen and gpus else 0.0)
        share -= COLOCATED_GPU_SHARE if self.heldout_prompts and gpus else 0.0
        policy = policy_spec(cfg, loss=type(self).loss, gpu_share=share)
        roles = {"policy": policy}
        if frozen:
            roles[REFERENCE] = policy.frozen_copy(REFERENCE, gpu_share=REFERENCE_GPU_SHARE)
        return roles

    # -------------------------------------------------------------- reference
    def sums(self, roles, per_rank, reference: bool, initial: bool = False) -> list[list[torch.Tensor]]:
        """Per-row summed completion log-probs of every micro-batch, under the policy, or
        (reference) the reference policy; `initial`: the policy before its first update,
        which is the reference of a method without one inside it."""
        if reference and not initial:
            lps = roles.reference_logprobs(per_rank)
        else:
            lps = roles.policy.call_per_rank("forward_logprobs", per_rank)
        return [[sequence_logps(lp, mb["labels"])[0] for mb, lp in zip(mbs, r)] for mbs, r in zip(per_rank, lps)]

    def attach_reference(self, roles, per_rank, key: str = "ref_logps") -> None:
        for mbs, sums in zip(per_rank, self.sums(roles, per_rank, reference=True)):
            for mb, s in zip(mbs, sums):
                mb[key] = s

    # ------------------------------------------------------------ pair batches
    def collate(self, pairs: list[dict[str, Any]], cache: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """`paired_collate` plus the pairs' indices, and their precomputed reference sums."""
        mb = paired_collate(pairs, self.pad)
        idx = torch.tensor([p.get("index", -1) for p in pairs])
        mb["index"] = idx
        if cache is not None:
            ref = torch.where(idx[:, None] >= 0, cache[idx.clamp(min=0)], torch.zeros(()))
            mb["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return mb

    def shard_pairs(self, pairs: list[dict[str, Any]], cache: Optional[torch.Tensor] = None):
        return shard(
            pairs,
            self.world,
            self.cfg.train.micro_batch_size,
            self.pad,
            collate_fn=lambda ps: self.collate(ps, cache),
            dummy=pair_dummy(self.pad),
        )

    def pair_sums(self, roles, pairs: list[dict[str, Any]], reference: bool, initial: bool = False) -> torch.Tensor:
        """[len(pairs), 2] summed completion log-probs (chosen, rejected), in `pairs` order."""
        indexed = [dict(p, index=i) for i, p in enumerate(pairs)]
        out = torch.zeros(len(pairs), 2)
        per_rank = self.shard_pairs(indexed)
        for mbs, sums in zip(per_rank, self.sums(roles, per_rank, reference, initial)):
            for mb, s in zip(mbs, sums):
                b = len(mb["index"])
                for j, i in enumerate(mb["index"].tolist()):
                    if i >= 0:
                        out[i] = torch.stack([s[j], s[b + j]])
        return out

    # ------------------------------------------------------------- precompute
    def precompute_reference(self, roles, start_step: int, pairs: Any) -> None:
        """Reference sums of every training and held-out pair, from the run directory when
        an earlier attempt stored them, else computed now (before any update) and stored."""
        path = Path(self.cfg.run.output_dir) / REFERENCE_FILE
        if path.is_file():
            self.ref_cache = torch.load(path)
            if len(self.ref_cache["train"]) != len(pairs) or len(self.ref_cache["heldout"]) != len(self.heldout):
                raise OrchestratorError(f"{path} holds reference log-probs of other data; delete it or the run dir")
            log.info("reference log-probs: reusing %s", path)
            return
        initial = self.frozen_copy_method
        if initial and start_step > 0:
            raise OrchestratorError(
                f"stage.precompute_ref: {path} is missing and the policy has already trained ({start_step} steps), "
                "so it is no longer the reference; start the run over in a new run.output_dir"
            )
        table = as_table(pairs)
        chunks = [
            self.pair_sums(roles, table.gather(range(s, min(s + PRECOMPUTE_CHUNK, len(table)))), True, initial)
            for s in range(0, len(table), PRECOMPUTE_CHUNK)
        ]
        self.ref_cache = {
            "train": torch.cat(chunks) if chunks else torch.zeros(0, 2),
            "heldout": self.pair_sums(roles, self.heldout, True, initial) if self.heldout else torch.zeros(0, 2),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(self.ref_cache, tmp)
        os.replace(tmp, path)
        log.info("reference log-probs of %d pairs computed once and stored in %s", len(pairs), path)

    # ------------------------------------------------------------- evaluation
    def score_pairs(self, batch: PairBatch) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(per-pair loss or None, chosen reward, rejected reward) of held-out pairs."""
        raise NotImplementedError

    def setup(self, roles, start_step: int, tracker) -> None:
        self._roles = roles
        if self.heldout_prompts:
            from orchestrator.rollout.group import RolloutGroup

            r = replace(self.cfg.rollout, placement="colocated")  # eval only: no resources of its own
            self.rollout = RolloutGroup(r, self.cfg.model, self.tokenizer, self.cfg.cluster, train_pg=roles.policy.pg)
        if self.heldout or self.heldout_prompts:
            key = "eval_before" if start_step == 0 else "eval_resumed"
            for name, value in self.evaluate(roles).items():
                self.eval_results[f"{key}/{name.removeprefix('eval/')}"] = value
            log.info("held-out (%s): %s", key, _fmt(self.eval_results, key))

    def evaluate(self, roles) -> dict[str, float]:
        """Held-out preference metrics (`eval/rewards/*`, `eval/loss`) and greedy exact match."""
        out: dict[str, float] = {}
        if self.heldout:
            out.update(self._pair_metrics(roles))
        if self.heldout_prompts and self.rollout is not None:
            self.rollout.sync(self.rollout.version + 1, roles.policy.call("inference_state")[0])
            e = self.cfg.eval
            out["eval/exact_match"] = greedy_accuracy(
                self.rollout,
                self.tokenizer,
                self.heldout_prompts,
                e.reward,
                e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                list(self.cfg.rollout.stop),
            )
        return out

    def _pair_metrics(self, roles) -> dict[str, float]:
        policy = self.pair_sums(roles, self.heldout, reference=False)
        lengths = torch.tensor([[len(p["chosen_ids"]), len(p["rejected_ids"])] for p in self.heldout])
        ref = None
        if not self.reference_free:
            if "heldout" not in self.ref_cache:  # the reference never changes: compute it once
                self.ref_cache["heldout"] = self.pair_sums(roles, self.heldout, reference=True)
            ref = self.ref_cache["heldout"]
        batch = PairBatch(
            policy[:, 0],
            policy[:, 1],
            lengths[:, 0],
            lengths[:, 1],
            None if ref is None else ref[:, 0],
            None if ref is None else ref[:, 1],
        )
        losses, chosen, rejected = self.score_pairs(batch)
        out = {
            "eval/rewards/accuracies": float((chosen > rejected).float().mean()),
            "eval/rewards/margins": float((chosen - rejected).mean()),
        }
        if losses is not None:
            out["eval/loss"] = float(losses.mean())
        return out

    def maybe_evaluate(self, roles, step: int) -> dict[str, float]:
        every = self.cfg.eval.every_steps
        if every and step % every == 0 and (self.heldout or self.heldout_prompts):
            return self.evaluate(roles)
        return {}

    def summary(self) -> dict[str, Any]:
        """Held-out numbers after training (the driver calls this before it stops the workers)."""
        if self._roles is not None and (self.heldout or self.heldout_prompts):
            for name, value in self.evaluate(self._roles).items():
                self.eval_results[f"eval_after/{name.removeprefix('eval/')}"] = value
            log.info("held-out after training: %s", _fmt(self.eval_results, "eval_after"))
        return dict(self.eval_results)

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.shutdown()
            self.rollout = None


def _fmt(results: dict[str, float], key: str) -> str:
    return ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in results.items() if k.startswith(key + "/"))


def pair_tokens(pairs: list[dict[str, Any]]) -> int:
    """Tokens a step of paired rows processes: the prompt twice, each completion once."""
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
