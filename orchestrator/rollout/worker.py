"""RolloutWorker: a Ray actor holding one rollout engine and the policy version it serves."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from orchestrator.rollout.base import SamplingParams


class RolloutWorker:
    def __init__(self, rollout_cfg, model_spec, index: int, tokenizer, engine_cls: type | None = None):
        from orchestrator.rollout import get_engine_class

        self.cfg, self.index = rollout_cfg, index
        device = (
            torch.device("cuda", 0)
            if rollout_cfg.gpus_per_worker > 0 and torch.cuda.is_available()
            else torch.device("cpu")
        )
        torch.set_num_threads(max(1, rollout_cfg.cpus_per_worker))
        cls = engine_cls or get_engine_class(rollout_cfg.engine)
        self.engine = cls(model_spec, rollout_cfg, tokenizer, device)
        self.version = 0

    def node_info(self) -> dict[str, Any]:
        import os

        import ray

        return {
            "pid": os.getpid(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def update_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        if state:
            self.engine.load_weights(state)
        self.version = version
        return version

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams, seed: int) -> dict[str, Any]:
        t = time.time()
        completions = self.engine.generate(prompts, sampling, seed)
        return {"version": self.version, "completions": [asdict(c) for c in completions], "time": time.time() - t}

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()
