"""Callbacks used by end-to-end tests (loaded by import path through run.callbacks), and small
in-process helpers shared by unit tests."""

import os
import signal


class KillAtStep:
    """SIGKILL the driver process at the end of step `extra.kill_at_step`: a real crash,
    after that step's metrics are logged and before its checkpoint would be written."""

    def __init__(self, cfg):
        self.step = int(cfg.extra["kill_at_step"])

    def on_step_end(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def flaky_reward(completion, answer, **_):
    """Raises on some completions (a buggy user reward): those samples must be masked."""
    if len(completion) % 3 == 0:
        raise ValueError("cannot score this completion")
    return 1.0 if any(c.isdigit() for c in completion) else 0.0


class KillWorkerAtStep:
    """SIGKILL one worker process (rank `extra.kill_rank`, default 1, of role `extra.kill_role`,
    default the policy) at the end of step `extra.kill_worker_at_step`, the first time only: a
    real dead actor mid-run."""

    def __init__(self, cfg):
        self.step = int(cfg.extra["kill_worker_at_step"])
        self.rank = int(cfg.extra.get("kill_rank", 1))
        self.role = str(cfg.extra.get("kill_role", "policy"))
        self.done = False

    def on_start(self, driver):
        self.driver = driver

    def on_step_end(self, step, metrics):
        if step == self.step and not self.done:
            self.done = True
            os.kill(self.driver.roles[self.role].nodes[self.rank]["pid"], signal.SIGKILL)


class RecordLogprobs:
    """At the end of step `extra.record_logprobs_at`, the policy workers' log-probs of a fixed
    batch (`batch()`), saved to `<run dir>/RecordLogprobs.FILE`: what the trained, sharded
    model computes, to compare with the exported one."""

    FILE = "recorded_logprobs.pt"

    def __init__(self, cfg):
        self.step = int(cfg.extra["record_logprobs_at"])
        self.path = f"{cfg.run.output_dir}/{self.FILE}"

    @staticmethod
    def batch():
        import torch

        g = torch.Generator().manual_seed(5)
        ids = torch.randint(5, 250, (2, 24), generator=g)
        return {"input_ids": ids, "position_ids": torch.arange(24).repeat(2, 1)}

    def on_start(self, driver):
        self.driver = driver

    def on_step_end(self, step, metrics):
        import torch

        if step == self.step:
            workers = self.driver.workers
            out = workers.call_per_rank("forward_logprobs", [[self.batch()]] * workers.world_size)
            torch.save(out[0][0], self.path)


class KillRolloutWorkerAtStep:
    """SIGKILL the rollout worker process (`extra.kill_rollout_index`, default 0) of an RL stage
    at the end of step `extra.kill_rollout_at_step`, the first time only; the step's metrics
    are written to `<run dir>/KillRolloutWorkerAtStep.FILE` first, to compare with the rerun."""

    FILE = "metrics_before_rollout_kill.json"

    def __init__(self, cfg):
        self.step = int(cfg.extra["kill_rollout_at_step"])
        self.index = int(cfg.extra.get("kill_rollout_index", 0))
        self.path = f"{cfg.run.output_dir}/{self.FILE}"
        self.done = False

    def on_start(self, driver):
        self.driver = driver

    def on_step_end(self, step, metrics):
        import json

        if step == self.step and not self.done:
            self.done = True
            with open(self.path, "w") as f:
                json.dump(metrics, f)
            os.kill(self.driver.stage.rollout.nodes[self.index]["pid"], signal.SIGKILL)


def train_steps(model, ids, lr: float, steps: int = 6) -> list:
    """`steps` AdamW steps of the LM loss on `ids` over the trainable parameters; the losses."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


class LocalGroup:
    """A frozen role's `forward_logprobs` on each rank's micro-batches, by a real model in-process."""

    def __init__(self, model, world: int):
        self.model, self.world_size = model, world

    def call_per_rank(self, method, per_rank):
        import torch

        from orchestrator.models.logprobs import token_logprobs

        assert method == "forward_logprobs" and len(per_rank) == self.world_size
        with torch.no_grad():
            return [[token_logprobs(self.model, mb, 256)[0] for mb in mbs] for mbs in per_rank]
