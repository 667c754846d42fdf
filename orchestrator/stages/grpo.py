"""GRPO stage: rollout -> reward -> group advantages -> clipped policy update -> weight sync.

The algorithm (advantages, aggregation, loss; with the papers it follows and where it
deviates) is in orchestrator/algos/grpo.py. This module is the driver-side pipeline:

1. take `prompts_per_step` prompts (resumable position, like SFT data); the prompts are
   read through the prepared-data path (`data/kinds.py` kind `prompts`, cached unless
   `data.cache=false`) and held in a list, as prompt sets are small;
2. the rollout engine (`rollout` config group) samples `rollout.n` completions each from
   policy version v, with their per-token log-probs when the engine has them cheaply
   (vLLM) or `stage.tis_cap` needs them;
3. rewards run in a process pool with a timeout; failed samples are masked;
4. advantages (`stage.estimator`, orchestrator/algos/advantages.py): per group (grpo, rloo),
   or REINFORCE++'s per-token returns with the KL penalty in the reward, normalised over the
   global batch once the old and reference log-probs are in (reinforce_pp); optionally drop
   zero-variance groups;
5. old log-probs are recomputed on the trainer when `num_iterations` > 1 (with one
   iteration the update is on-policy and the ratio is exp(logp - logp.detach()) = 1),
   reference log-probs when `kl_coef` > 0 (the method's reference: adapters or expert
   slices off on the policy's workers, or a frozen `reference` role for `method=full`);
6. `num_iterations` optimizer steps over the batch; then weights sync to rollout as v+1,
   under the base model's Hugging Face names (`Method.hf_weights`).

The rollout engine's log-probs travel in the micro-batches (`rollout_logp`); the loss
compares them with the trainer's old log-probs (logged as `rollout/logprob_diff_mean` and
`rollout/logprob_diff_max`) and, with `stage.tis_cap`, reweights each token's policy-gradient
term by truncated importance sampling (orchestrator/algos/off_policy.py).

Sampling is seeded from (train.seed, step), so a resumed run draws the same samples.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from orchestrator.algos.advantages import reinforce_pp, rloo
from orchestrator.algos.grpo import clipped_policy_loss, group_advantages, token_weights, zero_std_groups
from orchestrator.algos.off_policy import logprob_mismatch, reduce_mismatch, truncated_is_weights
from orchestrator.config.schema import REWARD_MODEL
from orchestrator.data.batching import BatchSource, shard
from orchestrator.data.chat import encode_prompt
from orchestrator.data.collate import rl_collate, rl_dummy
from orchestrator.data.heldout import heldout_prompts
from orchestrator.data.kinds import decode_prompt
from orchestrator.data.prepare import load_examples
from orchestrator.data.table import as_table
from orchestrator.evaluation import greedy_accuracy
from orchestrator.methods import METHODS, Reference
from orchestrator.models.logprobs import token_logprobs
from orchestrator.rewards.learned import LearnedReward, reward_model_spec
from orchestrator.rewards.runner import RewardRunner
from orchestrator.roles import REFERENCE, RoleSpec, policy_spec
from orchestrator.rollout import get_engine_class
from orchestrator.rollout.base import COLOCATED_GPU_SHARE, SamplingParams
from orchestrator.stages.base import Stage, step_metrics, train_on_workers

log = logging.getLogger("orchestrator")

REFERENCE_GPU_SHARE = 0.1
"""Share of a policy bundle's GPU a colocated frozen reference copy takes (forwards only)."""


def global_tokens(mbs: list[dict[str, Any]], per_mb: list[torch.Tensor]) -> torch.Tensor:
    """Per-micro-batch token tensors [B_i, w_i] (aligned with each one's `weights`) as one
    [sum B_i, max w_i] tensor of the global batch, zero-padded on the right."""
    width = max(mb["weights"].shape[1] for mb in mbs)
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in per_mb])


def per_micro_batch(mbs: list[dict[str, Any]], x: torch.Tensor) -> list[torch.Tensor]:
    """`global_tokens` undone: each micro-batch's rows of `x`, cut to its own width."""
    out, start = [], 0
    for mb in mbs:
        b, w = mb["weights"].shape
        out.append(x[start : start + b, :w].contiguous())
        start += b
    return out


class GrpoStage(Stage):
    uses_rollout = True

    @classmethod
    def data_kind(cls, cfg) -> tuple[str, dict[str, Any]]:
        """RL prompts, with the answer the verifiable rewards check (`data/kinds.py`); a learned
        reward alone needs none (prompts of preference rows then serve too)."""
        return "prompts", {"need_answer": any(r.name != REWARD_MODEL for r in cfg.stage.rewards)}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        g = cfg.stage
        self.g, self.r = g, cfg.rollout
        # RL prompt sets are small (thousands of rows) and each step renders its prompts anew,
        # so the prompts are read through the prepared path (cached) and then held in a list.
        table = as_table(load_examples(cfg.data, *self.data_kind(cfg), tokenizer))
        prompts = [decode_prompt(ex) for ex in table.gather(range(len(table)))]
        self.heldout = (
            heldout_prompts(cfg.data, prompts, cfg.eval.samples) if cfg.data.source.startswith("synthetic:") else []
        )
        self.source = BatchSource(
            [{"input_ids": [i], "labels": [i]} for i in range(len(prompts))],
            "padded",
            1 << 30,
            g.prompts_per_step,
            seed=cfg.data.seed,
            shuffle=cfg.data.shuffle,
            group_by_length=False,
        )
        self.prompts = prompts
        self.world = cfg.cluster.num_workers
        self.version = 0
        verifiable = [spec for spec in g.rewards if spec.name != REWARD_MODEL]
        self.rewards = RewardRunner(verifiable, g.reward_timeout_s, g.reward_workers) if verifiable else None
        self.learned = [spec for spec in g.rewards if spec.name == REWARD_MODEL]
        self.reward_model = (
            LearnedReward(g.reward_model, tokenizer.pad_token_id, self.world, cfg.train.micro_batch_size)
            if self.learned
            else None
        )
        self.rollout = None
        self.tracker = None
        # The engine's log-probs: for the correction, or (when they cost nothing) to log the mismatch.
        self.want_logprobs = g.tis_cap is not None or get_engine_class(self.r.engine).cheap_logprobs
        self.eval_results: dict[str, float] = {}
        log.info(
            "GRPO: %d prompts (%d held out for eval), %d per step x %d samples",
            len(prompts),
            len(self.heldout),
            g.prompts_per_step,
            self.r.n,
        )

    def roles(self) -> dict[str, RoleSpec]:
        """The policy, and a frozen reference copy when the KL term needs one the method
        cannot give by switching its trained weights off (`method=full`)."""
        cfg = self.cfg
        frozen_ref = cfg.stage.kl_coef > 0 and METHODS[cfg.method.name](cfg.method).reference is Reference.FROZEN_COPY
        share = 1.0
        if self.r.placement == "colocated" and cfg.cluster.gpus_per_worker:
            share -= COLOCATED_GPU_SHARE
        if frozen_ref and cfg.cluster.gpus_per_worker:
            share -= REFERENCE_GPU_SHARE
        if self.learned and cfg.cluster.gpus_per_worker:
            share -= cfg.stage.reward_model.gpu_share
        policy = policy_spec(cfg, loss=type(self).loss, gpu_share=share)
        roles = {"policy": policy}
        if frozen_ref:
            roles[REFERENCE] = policy.frozen_copy(REFERENCE, gpu_share=REFERENCE_GPU_SHARE)
        if self.learned:
            roles[REWARD_MODEL] = reward_model_spec(cfg, policy, cfg.stage.reward_model.gpu_share)
        return roles

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or t.epochs * self.source.batches_per_epoch

    # ------------------------------------------------------------ lifecycle
    def setup(self, roles, start_step: int, tracker) -> None:
        from orchestrator.rollout.group import RolloutGroup

        self.tracker = tracker
        self.rollout = RolloutGroup(self.r, self.cfg.model, self.tokenizer, self.cfg.cluster, train_pg=roles.policy.pg)
        stats = self.rollout.sync(self.version, roles.policy.call("inference_state")[0])
        log.info(
            "rollout: %d %s worker(s) (%s), initial weight sync %.2fs",
            len(self.rollout.actors),
            self.r.engine,
            self.r.placement,
            stats["time/sync"],
        )
        if self.heldout:
            key = "eval_before" if start_step == 0 else "eval_resumed"
            self.eval_results[key] = self.evaluate()
            log.info("held-out accuracy (%s, %d prompts): %.1f%%", key, len(self.heldout), 100 * self.eval_results[key])

    def evaluate(self) -> float:
        e = self.cfg.eval
        return greedy_accuracy(
            self.rollout,
            self.tokenizer,
            self.heldout,
            e.reward,
            e.max_new_tokens or self.r.max_new_tokens,
            list(self.r.stop),
        )

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        if self.rollout is not None:
            self.rollout.shutdown()
            self.rollout = None

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.source.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["data"])
        self.version = int(state["version"])

    def summary(self) -> dict[str, Any]:
        if self.heldout and self.rollout is not None:
            self.eval_results["eval_after"] = self.evaluate()
            log.info("held-out accuracy after training: %.1f%%", 100 * self.eval_results["eval_after"])
        return dict(self.eval_results)

    # ------------------------------------------------------------------ step
    def step(self, roles, step: int) -> dict[str, Any]:
        g, r, t0 = self.g, self.r, time.time()
        times: dict[str, float] = {}
        batch = [self.prompts[row["input_ids"][0]] for row in self.source.next()]
        prompt_ids = [encode_prompt(self.tokenizer, p["messages"]) for p in batch]

        t = time.time()
        sampling = SamplingParams(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop=list(r.stop),
            logprobs=self.want_logprobs,
        )
        completions = self.rollout.generate(prompt_ids, sampling, seed=self.cfg.train.seed * 1_000_003 + step)
        comps = [c.token_ids for c in completions]
        lps = [c.logprobs for c in completions] if self.want_logprobs else None
        if g.tis_cap is not None and any(lp is None for lp in lps):
            raise RuntimeError(f"stage.tis_cap needs the rollout engine's log-probs; rollout={r.engine} returned none")
        times["time/rollout"] = time.time() - t
        rollout_version = self.rollout.version

        t = time.time()
        texts = [c.text for c in completions]
        answers = [p["answer"] for p in batch for _ in range(r.n)]
        sample_prompts = [prompt_ids[i // r.n] for i in range(len(comps))]
        rewards, valid, rstats = self._score(roles, texts, answers, sample_prompts, comps)
        times["time/reward"] = time.time() - t
        rows, metrics = self._rows(prompt_ids, comps, rewards, valid, lps)
        metrics.update(rollout_version=rollout_version, **rstats)
        if rows:
            metrics.update(self._train(roles, rows, times, step))
        else:
            log.warning("step %d: no sample carries signal (all groups flat or masked); no update", step)
        times["time/step"] = time.time() - t0
        metrics.update(
            times, tokens=sum(len(p) + len(c) for p, c in zip([prompt_ids[i // r.n] for i in range(len(comps))], comps))
        )
        if g.log_samples_every and step % g.log_samples_every == 0 and self.tracker is not None:
            self._log_samples(step, batch, texts, rewards)
        if self.cfg.eval.every_steps and self.heldout and step % self.cfg.eval.every_steps == 0:
            metrics["eval_accuracy"] = self.evaluate()
        return metrics

    def _score(
        self, roles, texts: list[str], answers: list[str], prompt_ids: list[list[int]], comps: list[list[int]]
    ) -> tuple[list[float], list[bool], dict[str, float]]:
        """Each sample's weighted reward: the verifiable functions (in their process pool) plus
        the learned reward (on the reward-model role); a validity mask; reward statistics."""
        if self.rewards is not None:
            rewards, valid, stats = self.rewards.score(texts, answers)
        else:
            rewards, valid, stats = [0.0] * len(texts), [True] * len(texts), {}
        if self.reward_model is not None:
            raw = self.reward_model.raw(roles[REWARD_MODEL], prompt_ids, comps)
            shaped = self.reward_model.shape(raw)
            weight = sum(spec.weight for spec in self.learned)
            rewards = [x + weight * float(v) for x, v in zip(rewards, shaped)]
            stats["reward/reward_model"] = float(raw.mean())
            stats["reward/reward_model_std"] = float(raw.std()) if len(raw) > 1 else 0.0
        return rewards, valid, stats

    def _rows(
        self,
        prompt_ids: list[list[int]],
        comps: list[list[int]],
        rewards: list[float],
        valid: list[bool],
        logprobs: list[list[float] | None] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Group advantages -> the rows to train (prompt + completion, token weight, advantage,
        and the rollout engine's log-probs of the completion when it returned them)."""
        g, n = self.g, self.r.n
        rw = torch.tensor(rewards)
        ok = torch.tensor(valid)
        if g.estimator == "rloo":
            adv = rloo(rw, n)
        elif g.estimator == "reinforce_pp":
            adv = rw  # the sequence reward: per-token advantages are computed in `_train`
        else:
            adv = group_advantages(rw, n, g.std_normalize)
        keep = ok.clone()
        flat = zero_std_groups(rw, n)
        if g.filter_zero_std_groups:
            keep &= ~flat.repeat_interleave(n)
        rows = self._train_rows(prompt_ids, comps, [bool(k) for k in keep], [float(a) for a in adv], logprobs)
        metrics: dict[str, Any] = {
            "reward_mean": float(rw[ok].mean()) if ok.any() else 0.0,
            "reward_std": float(rw[ok].std()) if ok.sum() > 1 else 0.0,
            "completion_len": sum(len(c) for c in comps) / len(comps),
            "zero_std_groups": float(flat.float().mean()),
            "samples_trained": len(rows),
            "accuracy": sum(1.0 for i, v in enumerate(valid) if v and rewards[i] >= 1.0) / len(valid),
        }
        return rows, metrics

    def _train_rows(
        self,
        prompt_ids: list[list[int]],
        comps: list[list[int]],
        keep: list[bool],
        adv: list[float],
        logprobs: list[list[float] | None] | None,
    ) -> list[dict[str, Any]]:
        """Prompt + completion rows of the kept non-empty samples: their token weight (per
        `stage.loss_agg`), advantage, and the rollout engine's log-probs when it sent them."""
        n = self.r.n
        idx = [i for i in range(len(comps)) if keep[i] and comps[i]]
        weights = token_weights([len(comps[i]) for i in idx], self.g.loss_agg, self.r.max_new_tokens)
        rows = []
        for i, w in zip(idx, weights):
            p = prompt_ids[i // n]
            row = {"input_ids": p + comps[i], "prompt_len": len(p), "weight": w, "adv": adv[i]}
            if logprobs is not None and logprobs[i] is not None:
                row["rollout_logp"] = logprobs[i]
            rows.append(row)
        return rows

    def _micro_batches(self, rows: list[dict[str, Any]], loss_kl_coef: float, **extra: Any) -> list[list[dict]]:
        """The rows as per-rank collated micro-batches carrying the loss's settings (`extra` too)."""
        g, pad = self.g, self.tokenizer.pad_token_id
        per_rank = shard(
            rows,
            self.world,
            self.cfg.train.micro_batch_size,
            pad,
            collate_fn=lambda rs: rl_collate(rs, pad),
            dummy=rl_dummy(pad),
        )
        ctx = {
            "world_size": self.world,
            "clip_low": g.clip_low,
            "clip_high": g.clip_high,
            "kl_coef": loss_kl_coef,
            "logits_chunk_mb": self.cfg.train.logits_chunk_mb,
            **extra,
        }
        if g.tis_cap is not None:
            ctx["tis_cap"] = g.tis_cap
        return [[dict(mb, **ctx) for mb in mbs] for mbs in per_rank]

    def _train(self, roles, rows: list[dict[str, Any]], times: dict[str, float], step: int) -> dict[str, float]:
        g, workers = self.g, roles.policy
        self.rollout.sleep()  # colocated: the trainer takes the GPU until the next rollout
        # REINFORCE++ puts the KL penalty in the reward, not in the loss
        per_rank = self._micro_batches(rows, 0.0 if g.estimator == "reinforce_pp" else g.kl_coef)
        t = time.time()
        if g.num_iterations > 1:
            for mbs, lps in zip(per_rank, workers.call_per_rank("forward_logprobs", per_rank)):
                for mb, lp in zip(mbs, lps):
                    mb["old_logp"] = lp
        if g.kl_coef > 0:
            for mbs, lps in zip(per_rank, roles.reference_logprobs(per_rank)):
                for mb, lp in zip(mbs, lps):
                    mb["ref_logp"] = lp
        if g.estimator == "reinforce_pp":
            self._reinforce_pp(workers, per_rank)
        times["time/old_logprob"] = time.time() - t
        t = time.time()
        out: dict[str, float] = {}
        for _ in range(g.num_iterations):
            results = train_on_workers(workers, per_rank, self.cfg.train.on_nonfinite, step)
            self.version += 1
        times["time/train"] = time.time() - t
        tokens = sum(m["tokens"] for m in results) or 1.0
        out.update(
            step_metrics(results),
            loss=sum(m["loss_sum"] for m in results),
            clip_frac=sum(m["clipped_tokens"] for m in results) / tokens,
            entropy=sum(m["entropy_sum"] for m in results) / tokens,
        )
        if g.kl_coef > 0:
            out["kl"] = sum(m["kl_sum"] for m in results) / tokens
        out.update(reduce_mismatch(results))  # rollout/logprob_diff_*: when the engine sent log-probs
        stats = self.rollout.sync(self.version, workers.call("inference_state")[0])
        times["time/sync"] = stats["time/sync"]
        out["policy_version"] = self.version
        return out

    def _reinforce_pp(self, workers, per_rank: list[list[dict[str, Any]]]) -> None:
        """Replace each micro-batch's sequence rewards (`adv` [B, 1]) with REINFORCE++ token
        advantages [B, L-1], normalised over every completion token of the global batch."""
        kl = self.g.kl_coef
        old = None
        if kl:
            if "old_logp" in per_rank[0][0]:
                old = [[mb["old_logp"] for mb in mbs] for mbs in per_rank]
            else:
                old = workers.call_per_rank("forward_logprobs", per_rank)
        mbs = [mb for r in per_rank for mb in r]
        mask = global_tokens(mbs, [(mb["weights"] > 0).float() for mb in mbs])
        rewards = torch.cat([mb["adv"][:, 0] for mb in mbs])
        logp = global_tokens(mbs, [lp for r in old for lp in r]) if kl else None
        ref = global_tokens(mbs, [mb["ref_logp"] for mb in mbs]) if kl else None
        adv = reinforce_pp(rewards, mask, logp, ref, kl_coef=kl)
        for mb, a in zip(mbs, per_micro_batch(mbs, adv)):
            mb["adv"] = a

    def _log_samples(self, step: int, batch, texts: list[str], rewards: list[float]) -> None:
        n = self.r.n
        rows = [
            [step, batch[i]["messages"][-1]["content"], texts[i * n], rewards[i * n], batch[i]["answer"]]
            for i in range(min(4, len(batch)))
        ]
        for row in rows:
            log.info("sample step %d | %r -> %r (reward %.2f, answer %s)", *row)
        self.tracker.log_table("samples", ["step", "prompt", "completion", "reward", "answer"], rows, step)

    # ---------------------------------------------------------- worker side
    @staticmethod
    def loss(model: torch.nn.Module, mb: dict[str, Any]):
        logp, entropy = token_logprobs(model, mb, mb["logits_chunk_mb"], with_entropy=True)
        old = mb["old_logp"] if "old_logp" in mb else logp.detach()
        adv = mb["adv"].expand_as(logp)
        rollout, cap = mb.get("rollout_logp"), mb.get("tis_cap")
        is_weights = truncated_is_weights(old, rollout, cap) if rollout is not None and cap is not None else None
        loss, metrics = clipped_policy_loss(
            logp,
            old,
            adv,
            mb["weights"],
            mb["clip_low"],
            mb["clip_high"],
            ref_logp=mb.get("ref_logp"),
            kl_coef=mb["kl_coef"],
            is_weights=is_weights,
        )
        with torch.no_grad():
            mask = (mb["weights"] > 0).float()
            metrics["entropy_sum"] = (entropy * mask).sum()
            metrics["loss_sum"] = loss.detach()
            if rollout is not None:
                metrics.update(logprob_mismatch(old, rollout, mask, cap))
        return loss * mb["world_size"], metrics
