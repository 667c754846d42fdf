"""RolloutWorker: a Ray actor with an unsharded policy copy for generation."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import torch


class RolloutWorker:
    def __init__(self, cfg, index: int, tokenizer):
        from orchestrator.methods import get_method
        from orchestrator.models import build_model, resolve_dtype

        self.cfg, self.index, self.tokenizer = cfg, index, tokenizer
        r = cfg.stage.rollout
        self.device = torch.device("cuda", 0) if r.gpus_per_worker > 0 and torch.cuda.is_available() \
            else torch.device("cpu")
        torch.set_num_threads(max(1, r.cpus_per_worker))
        dtype = torch.float32 if cfg.model.dtype == "auto" and self.device.type == "cpu" \
            else resolve_dtype(cfg.model, self.device.type == "cuda")
        model = build_model(cfg.model, dtype)
        # Same structure and seed as the trainer's copy, so synced state dict keys match.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model = get_method(cfg).apply(model)
        self.model = model.to(self.device).eval()
        self.model.generation_config.use_cache = True
        self.version = 0

    def update_weights(self, version: int, state: Dict[str, torch.Tensor]) -> int:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"weight sync sent keys the rollout model lacks: {unexpected[:3]}")
        self.version = version
        return version

    def generate(self, prompts: Sequence[List[int]], n: int, sampling: Dict[str, Any], seed: int) -> Dict[str, Any]:
        from orchestrator.rollout.hf import generate

        t = time.time()
        torch.manual_seed(seed)
        completions = generate(self.model, self.tokenizer, prompts, n, sampling,
                               self.cfg.stage.rollout.batch_size, self.device)
        return {"version": self.version, "completions": completions, "time": time.time() - t}
