"""What every stage shares: the driver-side protocol and the train-step call."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Sequence

from orchestrator.errors import NonFiniteError

log = logging.getLogger("orchestrator")


class Stage:
    """Driver side of an objective. The worker side is the static `loss(model, micro_batch)`."""

    train_gpu_share = 1.0
    """Fraction of each train bundle's GPU the train actor takes (colocated rollout uses the rest)."""

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    def setup(self, workers, start_step: int, tracker) -> None:
        """Called once the workers hold the (possibly resumed) model."""

    def step(self, workers, step: int) -> Dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def summary(self) -> Dict[str, Any]:
        """Extra entries for the run's summary.json."""
        return {}

    def close(self) -> None:
        pass


def train_on_workers(workers, per_rank: Sequence[List[Dict[str, Any]]], on_nonfinite: str,
                     step: int) -> List[Dict[str, float]]:
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


def step_metrics(results: List[Dict[str, float]]) -> Dict[str, float]:
    r0 = results[0]
    return {"grad_norm": r0["grad_norm"], "lr": r0["lr"], "skipped": r0["skipped"]}
