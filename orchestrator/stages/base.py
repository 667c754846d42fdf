"""What every stage shares: the driver-side protocol and the train-step call.

A stage is the objective. Driver side, it declares the roles it needs (`roles`), turns
data into per-rank micro-batches, keeps the data position and reports metrics; worker
side, its `loss(model, micro_batch)` (a pure function of the batch, shipped in the policy
role's spec) turns a micro-batch into a loss. The driver hands `step` the live worker
groups (`orchestrator.roles.Roles`); a stage never builds or restarts them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from orchestrator.errors import NonFiniteError
from orchestrator.roles import RoleSpec, policy_spec

log = logging.getLogger("orchestrator")


class Stage:
    """Driver side of an objective. The worker side is the static `loss(model, micro_batch)`."""

    uses_rollout = False
    """Whether the stage generates with the rollout engine (launchers size Ray for it)."""

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def roles(self) -> dict[str, RoleSpec]:
        """The worker groups this stage trains or reads, by role name (`policy` always)."""
        return {"policy": policy_spec(self.cfg, loss=type(self).loss)}

    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    def setup(self, roles, start_step: int, tracker) -> None:
        """Called once the workers hold the (possibly resumed) model, and again after recovery."""

    def step(self, roles, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Extra entries for the run's summary.json."""
        return {}

    def close(self) -> None:
        pass

    @staticmethod
    def loss(model, mb: dict[str, Any]):
        raise NotImplementedError


def train_on_workers(
    workers, per_rank: Sequence[list[dict[str, Any]]], on_nonfinite: str, step: int
) -> list[dict[str, float]]:
    """One optimizer step on every rank; a non-finite step is skipped everywhere or stops the run."""
    t = time.time()
    results = workers.call_per_rank("train_step", per_rank)
    results[0]["train_time"] = time.time() - t
    if results[0]["skipped"]:
        bad = [r for r, m in enumerate(results) if not m["local_finite"]]
        where = f"rank(s) {bad}" if bad else "the gradient reduction"
        msg = f"step {step}: non-finite loss or gradient norm from {where}; no rank applied the update"
        if on_nonfinite == "stop":
            raise NonFiniteError(msg + " (train.on_nonfinite=stop)")
        log.warning(msg + " (train.on_nonfinite=skip)")
    return results


def step_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    r0 = results[0]
    return {"grad_norm": r0["grad_norm"], "lr": r0["lr"], "skipped": r0["skipped"]}
