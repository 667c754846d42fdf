"""PPO stage: GRPO's RL loop with a critic, GAE and a KL-shaped reward.

One RL loop, not two: this is `GrpoStage` (rollout -> rewards -> advantages -> clipped
policy update -> weight sync; orchestrator/stages/grpo.py) with `stage.estimator=gae`
swapping the group baseline for a learned one. The algorithm and its papers are in
orchestrator/algos/ppo.py. With another estimator (grpo, rloo, reinforce_pp) no critic is
built and the step is GRPO's, rewards included.

Roles: `policy` (trained), `critic` (trained, a value head: `AutoModelForTokenClassification`
with one output, its own learning rate `stage.critic_lr`; it starts from the reward model's
weights or the policy's, `stage.critic_init`), the reference (adapters off, or a frozen copy
for `method=full`), and `reward_model` (frozen, when `stage.rewards` names it). Every
trained role checkpoints with the run; a dead worker of any role takes in-job recovery.

A step after the rollout and rewards:

1. old log-probs (policy), reference log-probs (when `kl_coef` > 0) and values (critic) of
   every completion token, on the workers;
2. on the driver, over the global batch: token rewards r_t = -kl_coef * KL_t plus the
   sequence's reward on its last token; GAE advantages and returns; advantages whitened;
3. `ppo_epochs` passes, each of `mini_batches` optimizer steps of the policy (clipped
   ratio, GRPO's loss with per-token advantages; skipped during `critic_warmup_steps`) and
   of the critic (clipped value loss);
4. the adaptive KL controller moves kl_coef (`kl_target`); weights sync to the rollout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch

from orchestrator.algos.advantages import gae
from orchestrator.algos.ppo import AdaptiveKL, clipped_value_loss, kl_shaped_rewards, whiten
from orchestrator.errors import ConfigError
from orchestrator.roles import CRITIC, RoleSpec
from orchestrator.stages.base import step_metrics, train_on_workers
from orchestrator.stages.grpo import GrpoStage, global_tokens, per_micro_batch

log = logging.getLogger("orchestrator")

CRITIC_GPU_SHARE = 0.3
"""Share of a policy bundle's GPU the colocated critic takes (it trains: weights, grads, Adam)."""


def check_ppo(s: Any, cfg: Any) -> None:
    """The rules of `stage=ppo` beyond GRPO's (PpoStageConfig.check)."""
    from orchestrator.config.checks import positive
    from orchestrator.config.schema import REWARD_MODEL

    positive(s.ppo_epochs, "stage.ppo_epochs")
    positive(s.mini_batches, "stage.mini_batches")
    positive(s.critic_lr, "stage.critic_lr")
    positive(s.critic_warmup_steps, "stage.critic_warmup_steps", allow_zero=True)
    positive(s.kl_horizon, "stage.kl_horizon")
    if not 0.0 <= s.gamma <= 1.0 or not 0.0 <= s.lam <= 1.0:
        raise ConfigError(f"stage.gamma={s.gamma} and stage.lam={s.lam} must be in [0, 1]")
    if s.value_clip is not None and s.value_clip <= 0:
        raise ConfigError(f"stage.value_clip={s.value_clip} must be > 0, or null for no clipping")
    if s.kl_target is not None and s.kl_target <= 0:
        raise ConfigError(f"stage.kl_target={s.kl_target} must be > 0, or null for a fixed kl_coef")
    if s.num_iterations != 1:
        raise ConfigError("stage=ppo takes stage.ppo_epochs (passes over each batch), not stage.num_iterations")
    if s.estimator == "gae" and s.critic_init == "reward_model" and not s.reward_model.path:
        raise ConfigError(
            "stage.critic_init=reward_model needs stage.reward_model.path (or set stage.critic_init=policy)"
        )
    if s.estimator == "gae" and not any(r.name == REWARD_MODEL for r in s.rewards) and not s.rewards:
        raise ConfigError("stage.rewards is empty")
    samples = s.prompts_per_step * cfg.rollout.n
    per_rank_micro = -(-samples // cfg.cluster.num_workers // cfg.train.micro_batch_size)
    if s.mini_batches > max(per_rank_micro, 1):
        raise ConfigError(
            f"stage.mini_batches={s.mini_batches} exceeds the {per_rank_micro} micro-batch(es) each worker gets "
            f"per step ({samples} samples / {cfg.cluster.num_workers} workers / train.micro_batch_size="
            f"{cfg.train.micro_batch_size}); lower it or the micro-batch size"
        )


class PpoStage(GrpoStage):
    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        g = cfg.stage
        self.with_critic = g.estimator == "gae"
        self.kl = AdaptiveKL(g.kl_coef, g.kl_target, g.kl_horizon)

    def roles(self) -> dict[str, RoleSpec]:
        """GRPO's roles (policy, reference, reward model), plus the critic with a value head."""
        roles = super().roles()
        if self.with_critic:
            roles[CRITIC] = self._critic_spec(roles["policy"])
        return roles

    def _critic_spec(self, policy: RoleSpec) -> RoleSpec:
        cfg, g = self.cfg, self.cfg.stage
        model = policy.model
        if g.critic_init == "reward_model":
            from orchestrator.rewards.learned import reward_model_dir

            path = str(reward_model_dir(g.reward_model.path))
            model = replace(model, pretrained=path, gguf_file=None)
        train = replace(cfg.train, lr=g.critic_lr)
        share = CRITIC_GPU_SHARE if cfg.cluster.gpus_per_worker else 0.0
        return replace(
            policy,
            name=CRITIC,
            model=model,
            train=train,
            loss=PpoStage.value_loss,
            head="value",
            colocate_with=policy.name,
            gpu_share=share,
            seed=policy.seed + 1,
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(super().state_dict(), kl_coef=self.kl.coef)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl.coef = float(state.get("kl_coef", self.cfg.stage.kl_coef))

    # ------------------------------------------------------------------ step
    def _rows(self, prompt_ids, comps, rewards, valid, logprobs=None):
        """With a critic: every valid sample trains (no group is flat for a critic), its reward
        carried in `adv` until GAE; token weights per `stage.loss_agg`."""
        if not self.with_critic:
            return super()._rows(prompt_ids, comps, rewards, valid, logprobs)
        rows = self._train_rows(prompt_ids, comps, list(valid), [float(r) for r in rewards], logprobs)
        rw = torch.tensor([rewards[i] for i in range(len(comps)) if valid[i]] or [0.0])
        metrics = {
            "reward_mean": float(rw.mean()),
            "reward_std": float(rw.std()) if len(rw) > 1 else 0.0,
            "completion_len": sum(len(c) for c in comps) / max(len(comps), 1),
            "samples_trained": len(rows),
        }
        return rows, metrics

    def _train(self, roles, rows: list[dict[str, Any]], times: dict[str, float], step: int) -> dict[str, float]:
        if not self.with_critic:
            return super()._train(roles, rows, times, step)
        g, policy, critic = self.g, roles.policy, roles[CRITIC]
        self.rollout.sleep()
        per_rank = self._micro_batches(rows, 0.0, value_clip=g.value_clip)  # the KL penalty is in the reward

        t = time.time()
        olds = policy.call_per_rank("forward_logprobs", per_rank)
        refs = roles.reference_logprobs(per_rank) if self.kl.coef > 0 else None
        values = critic.call_per_rank("forward_eval", per_rank, fn=PpoStage.values)
        times["time/old_logprob"] = time.time() - t
        stats = self._advantages(per_rank, olds, refs, values)

        t = time.time()
        train_policy = step > g.critic_warmup_steps
        k = min(g.mini_batches, len(per_rank[0]))  # fewer valid samples than planned: fewer, fuller mini-batches
        for mbs in per_rank:  # each optimizer step sees 1/k of the batch: its loss is a mean over it
            for mb in mbs:
                mb["weights"] = mb["weights"] * k
                mb["vf_weights"] = mb["vf_weights"] * k
        policy_results, critic_results = [], []
        for _ in range(g.ppo_epochs):
            for j in range(k):
                part = [mbs[j::k] for mbs in per_rank]
                if train_policy:
                    policy_results.append(train_on_workers(policy, part, self.cfg.train.on_nonfinite, step))
                critic_results.append(train_on_workers(critic, part, self.cfg.train.on_nonfinite, step))
        if train_policy:
            self.version += 1
        times["time/train"] = time.time() - t

        out = dict(stats)
        tokens = sum(float((mb["weights"] > 0).sum()) for mbs in per_rank for mb in mbs) or 1.0
        passes = len(critic_results)
        vf = [m for res in critic_results for m in res]
        out["critic/value_loss"] = sum(m["value_loss_sum"] for m in vf) / passes
        out["critic/vf_clip_frac"] = sum(m["vf_clipped_tokens"] for m in vf) / tokens / passes
        out["critic/grad_norm"] = critic_results[-1][0]["grad_norm"]
        if train_policy:
            last = policy_results[-1]
            pol = [m for res in policy_results for m in res]
            out.update(
                step_metrics(last),
                loss=sum(m["loss_sum"] for m in pol) / len(policy_results),
                clip_frac=sum(m["clipped_tokens"] for m in pol) / tokens / len(policy_results),
                entropy=sum(m["entropy_sum"] for m in pol) / tokens / len(policy_results),
            )
            sync = self.rollout.sync(self.version, policy.call("inference_state")[0])
            times["time/sync"] = sync["time/sync"]
        out["policy_version"] = self.version
        out["kl_coef"] = self.kl.update(stats["kl"], len(rows))
        return out

    def _advantages(self, per_rank, olds, refs, values) -> dict[str, float]:
        """Token rewards, GAE and whitening over the global batch; writes `adv`, `returns`,
        `old_values`, `old_logp` and `vf_weights` into every micro-batch."""
        g = self.g
        mbs = [mb for r in per_rank for mb in r]
        flat_old = [lp for r in olds for lp in r]
        mask = global_tokens(mbs, [(mb["weights"] > 0).float() for mb in mbs])
        scores = torch.cat([mb["adv"][:, 0] for mb in mbs])
        logp = global_tokens(mbs, flat_old)
        ref = global_tokens(mbs, [lp for r in refs for lp in r]) if refs is not None else None
        vals = global_tokens(mbs, [v for r in values for v in r]).float()
        rewards, kl = kl_shaped_rewards(scores, mask, logp, ref, self.kl.coef, g.kl_estimator)
        adv, returns = gae(rewards.float(), vals, mask, g.gamma, g.lam)
        if g.whiten_advantages:
            adv = whiten(adv, mask)
        n_tokens = mask.sum().clamp(min=1)
        parts = (per_micro_batch(mbs, t) for t in (adv, returns, vals, mask / n_tokens * self.world))
        for mb, lp, a, ret, v, vf in zip(mbs, flat_old, *parts):
            mb.update(adv=a, returns=ret, old_values=v, old_logp=lp, vf_weights=vf)
        seqs = max(int((mask.sum(1) > 0).sum()), 1)
        return {
            "kl": float(kl.sum()) / seqs,
            "critic/values_mean": float((vals * mask).sum() / n_tokens),
            "critic/returns_mean": float((returns * mask).sum() / n_tokens),
            "score_mean": float(scores.mean()),
        }

    # ---------------------------------------------------------- worker side
    @staticmethod
    def values(model: torch.nn.Module, mb: dict[str, Any]) -> torch.Tensor:
        """[B, L-1] value of the state before each target token (the critic's output at t);
        [B, 1] for rows of one token (a rank's filler row, as `rl_collate` shapes its weights)."""
        out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"])
        v = out.logits[..., 0]
        return v[:, :-1] if v.shape[1] > 1 else v * 0.0

    @staticmethod
    def value_loss(model: torch.nn.Module, mb: dict[str, Any]):
        v = PpoStage.values(model, mb).float()
        loss, metrics = clipped_value_loss(v, mb["old_values"], mb["returns"], mb["vf_weights"], mb["value_clip"])
        metrics["value_loss_sum"] = loss.detach() / mb["world_size"]
        return loss, metrics
