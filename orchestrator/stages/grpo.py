"""GRPO stage: rollout -> reward -> group advantages -> clipped policy update -> weight sync.

The algorithm (advantages, aggregation, loss; with the papers it follows and where it
deviates) is in orchestrator/algos/grpo.py. This module is the driver-side pipeline:

1. take `prompts_per_step` prompts (resumable position, like SFT data);
2. rollout workers sample `rollout.n` completions each from policy version v;
3. rewards run in a process pool with a timeout; failed samples are masked;
4. advantages per group; optionally drop zero-variance groups;
5. old log-probs are recomputed on the trainer when `num_iterations` > 1 (with one
   iteration the update is on-policy and the ratio is exp(logp - logp.detach()) = 1),
   reference log-probs when `kl_coef` > 0;
6. `num_iterations` optimizer steps over the batch; then weights sync to rollout as v+1.

Sampling is seeded from (train.seed, step), so a resumed run draws the same samples.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Sequence

import torch

from orchestrator.algos.grpo import clipped_policy_loss, group_advantages, token_weights, zero_std_groups
from orchestrator.data.batching import BatchSource, shard
from orchestrator.data.prompts import load_prompts
from orchestrator.data.sources import load_rows
from orchestrator.models import token_logprobs
from orchestrator.rewards.runner import RewardRunner
from orchestrator.stages.base import Stage, step_metrics, train_on_workers

log = logging.getLogger("orchestrator")


def _collate(rows: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    length = max(len(r["input_ids"]) for r in rows)
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    weights = torch.zeros(b, length - 1) if length > 1 else torch.zeros(b, 1)
    adv = torch.zeros(b, 1)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        start = r["prompt_len"] - 1  # target index of the first completion token
        weights[i, start:n - 1] = r["weight"]
        adv[i, 0] = r["adv"]
    pos = torch.arange(length).repeat(b, 1)
    return {"input_ids": ids, "position_ids": pos, "weights": weights, "adv": adv}


class GrpoStage(Stage):
    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        g = cfg.stage
        self.g = g
        prompts = load_prompts(cfg.data)
        self.heldout = self._heldout(prompts)
        self.source = BatchSource([{"input_ids": [i], "labels": [i]} for i in range(len(prompts))], "padded",
                                  1 << 30, g.prompts_per_step, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                  group_by_length=False)
        self.prompts = prompts
        self.prompt_ids = [self._encode(p["messages"]) for p in prompts]
        self.world = cfg.cluster.num_workers
        self.version = 0
        self.rewards = RewardRunner(g.rewards, g.reward_timeout_s, g.reward_workers)
        self.rollout = None
        self.tracker = None
        self.eval_results: Dict[str, float] = {}
        if g.rollout.placement == "colocated" and cfg.cluster.gpus_per_worker:
            self.train_gpu_share = 0.75
        log.info("GRPO: %d prompts (%d held out for eval), %d per step x %d samples", len(prompts),
                 len(self.heldout), g.prompts_per_step, g.rollout.n)

    # ------------------------------------------------------------------ data
    def _encode(self, messages) -> List[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _heldout(self, train: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Eval prompts never trained on: the generator's `_heldout` stream when it has one
        (disjoint from every training stream, SFT warm-up included), else a second stream
        minus the training prompts."""
        d = self.cfg.data
        if not self.g.eval_samples or not d.source.startswith("synthetic:"):
            return []
        from dataclasses import replace

        from orchestrator.data.prompts import prompt_rows

        from orchestrator.data.synthetic import GENERATORS

        seen = {json.dumps(p["messages"]) for p in train}
        held = f"{d.source}_heldout"
        src = held if held.split(":", 1)[1] in GENERATORS else d.source  # disjoint by construction
        extra = prompt_rows(load_rows(replace(d, source=src, seed=d.seed + 10_000,
                                              num_samples=4 * self.g.eval_samples)), d)
        unique = {json.dumps(p["messages"]): p for p in extra if json.dumps(p["messages"]) not in seen}
        return list(unique.values())[: self.g.eval_samples]

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or t.epochs * self.source.batches_per_epoch

    # ------------------------------------------------------------ lifecycle
    def setup(self, workers, start_step: int, tracker) -> None:
        from orchestrator.rollout.group import RolloutGroup

        self.tracker = tracker
        self.rollout = RolloutGroup(self.cfg, self.tokenizer, train_pg=workers.pg)
        stats = self.rollout.sync(self.version, workers.call("trainable_state")[0])
        log.info("rollout: %d worker(s) (%s), initial weight sync %.2fs", len(self.rollout.actors),
                 self.g.rollout.placement, stats["time/sync"])
        if self.heldout:
            key = "eval_before" if start_step == 0 else "eval_resumed"
            self.eval_results[key] = self.evaluate()
            log.info("held-out accuracy (%s, %d prompts): %.1f%%", key, len(self.heldout),
                     100 * self.eval_results[key])

    def evaluate(self) -> float:
        r = self.g.rollout
        prompts = [self._encode(p["messages"]) for p in self.heldout]
        comps = self.rollout.generate(prompts, 1, {"temperature": 0, "top_p": 1.0,
                                                   "max_new_tokens": r.max_new_tokens, "stop": list(r.stop)}, 0)
        from orchestrator.rewards import resolve

        fn = resolve(self.g.eval_reward)
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=True)
        return sum(fn(t, p["answer"]) for t, p in zip(texts, self.heldout)) / len(self.heldout)

    def close(self) -> None:
        self.rewards.close()
        if self.rollout is not None:
            self.rollout.shutdown()

    def state_dict(self) -> Dict[str, Any]:
        return {"data": self.source.state_dict(), "version": self.version}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.source.load_state_dict(state["data"])
        self.version = int(state["version"])

    def summary(self) -> Dict[str, Any]:
        if self.heldout and self.rollout is not None:
            self.eval_results["eval_after"] = self.evaluate()
            log.info("held-out accuracy after training: %.1f%%", 100 * self.eval_results["eval_after"])
        return dict(self.eval_results)

    # ------------------------------------------------------------------ step
    def step(self, workers, step: int) -> Dict[str, Any]:
        g, r, t0 = self.g, self.g.rollout, time.time()
        times: Dict[str, float] = {}
        batch = [self.prompts[row["input_ids"][0]] for row in self.source.next()]
        prompt_ids = [self._encode(p["messages"]) for p in batch]

        t = time.time()
        sampling = {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
                    "stop": list(r.stop)}
        comps = self.rollout.generate(prompt_ids, r.n, sampling, seed=self.cfg.train.seed * 1_000_003 + step)
        times["time/rollout"] = time.time() - t
        rollout_version = self.rollout.version

        t = time.time()
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=True)
        answers = [p["answer"] for p in batch for _ in range(r.n)]
        rewards, valid, rstats = self.rewards.score(texts, answers)
        times["time/reward"] = time.time() - t
        rw = torch.tensor(rewards)
        ok = torch.tensor(valid)
        adv = group_advantages(rw, r.n, g.std_normalize)
        keep = ok.clone()
        flat = zero_std_groups(rw, r.n)
        if g.filter_zero_std_groups:
            keep &= ~flat.repeat_interleave(r.n)

        rows = []
        idx = [i for i in range(len(comps)) if keep[i] and comps[i]]
        weights = token_weights([len(comps[i]) for i in idx], g.loss_agg, r.max_new_tokens)
        for i, w in zip(idx, weights):
            p = prompt_ids[i // r.n]
            rows.append({"input_ids": p + comps[i], "prompt_len": len(p), "weight": w, "adv": float(adv[i])})

        metrics: Dict[str, Any] = {
            "reward_mean": float(rw[ok].mean()) if ok.any() else 0.0,
            "reward_std": float(rw[ok].std()) if ok.sum() > 1 else 0.0,
            "completion_len": sum(len(c) for c in comps) / len(comps),
            "zero_std_groups": float(flat.float().mean()), "samples_trained": len(rows),
            "rollout_version": rollout_version, **rstats}
        metrics["accuracy"] = sum(1.0 for i, v in enumerate(valid) if v and rewards[i] >= 1.0) / len(valid)
        if rows:
            metrics.update(self._train(workers, rows, times, step))
        else:
            log.warning("step %d: no sample carries signal (all groups flat or masked); no update", step)
        times["time/step"] = time.time() - t0
        metrics.update(times, tokens=sum(len(p) + len(c) for p, c in zip(
            [prompt_ids[i // r.n] for i in range(len(comps))], comps)))
        if g.log_samples_every and step % g.log_samples_every == 0 and self.tracker is not None:
            self._log_samples(step, batch, texts, rewards)
        return metrics

    def _train(self, workers, rows: List[Dict[str, Any]], times: Dict[str, float], step: int) -> Dict[str, float]:
        g = self.g
        pad = self.tokenizer.pad_token_id
        dummy = {"input_ids": [pad], "prompt_len": 1, "weight": 0.0, "adv": 0.0}
        per_rank = shard(rows, self.world, self.cfg.train.micro_batch_size, pad,
                         collate_fn=lambda rs: _collate(rs, pad), dummy=dummy)
        ctx = {"world_size": self.world, "clip_low": g.clip_low, "clip_high": g.clip_high, "kl_coef": g.kl_coef}
        per_rank = [[dict(mb, **ctx) for mb in mbs] for mbs in per_rank]
        t = time.time()
        if g.num_iterations > 1:
            for mbs, lps in zip(per_rank, workers.call_per_rank("forward_logprobs", per_rank)):
                for mb, lp in zip(mbs, lps):
                    mb["old_logp"] = lp
        if g.kl_coef > 0:
            refs = workers.call_per_rank("forward_logprobs", per_rank, reference=True)
            for mbs, lps in zip(per_rank, refs):
                for mb, lp in zip(mbs, lps):
                    mb["ref_logp"] = lp
        times["time/old_logprob"] = time.time() - t
        t = time.time()
        out: Dict[str, float] = {}
        for _ in range(g.num_iterations):
            results = train_on_workers(workers, per_rank, self.cfg.train.on_nonfinite, step)
            self.version += 1
        times["time/train"] = time.time() - t
        tokens = sum(m["tokens"] for m in results) or 1.0
        out.update(step_metrics(results), loss=sum(m["loss_sum"] for m in results),
                   clip_frac=sum(m["clipped_tokens"] for m in results) / tokens,
                   entropy=sum(m["entropy_sum"] for m in results) / tokens)
        if g.kl_coef > 0:
            out["kl"] = sum(m["kl_sum"] for m in results) / tokens
        stats = self.rollout.sync(self.version, workers.call("trainable_state")[0])
        times["time/sync"] = stats["time/sync"]
        out["policy_version"] = self.version
        return out

    def _log_samples(self, step: int, batch, texts: List[str], rewards: List[float]) -> None:
        n = self.g.rollout.n
        rows = [[step, batch[i]["messages"][-1]["content"], texts[i * n], rewards[i * n], batch[i]["answer"]]
                for i in range(min(4, len(batch)))]
        for row in rows:
            log.info("sample step %d | %r -> %r (reward %.2f, answer %s)", *row)
        wb = self.tracker.wandb if self.tracker is not None else None
        if wb is not None:
            try:
                import wandb

                wb.log({"samples": wandb.Table(columns=["step", "prompt", "completion", "reward", "answer"],
                                               data=rows)}, step=step)
            except Exception as exc:
                log.warning("W&B: sample table failed (%s)", exc)

    # ---------------------------------------------------------- worker side
    @staticmethod
    def loss(model: torch.nn.Module, mb: Dict[str, Any]):
        logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
        logp = token_logprobs(logits, mb["input_ids"])
        old = mb["old_logp"] if "old_logp" in mb else logp.detach()
        adv = mb["adv"].expand_as(logp)
        loss, metrics = clipped_policy_loss(logp, old, adv, mb["weights"], mb["clip_low"], mb["clip_high"],
                                            ref_logp=mb.get("ref_logp"), kl_coef=mb["kl_coef"])
        with torch.no_grad():
            mask = (mb["weights"] > 0).float()
            p = torch.softmax(logits[:, :-1].float(), dim=-1)
            entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            metrics["entropy_sum"] = (entropy * mask).sum()
            metrics["loss_sum"] = loss.detach()
        return loss * mb["world_size"], metrics
