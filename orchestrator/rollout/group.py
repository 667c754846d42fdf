"""RolloutGroup: places rollout actors, fans prompts out, syncs weights (versioned)."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import WorkerError
from orchestrator.rollout.worker import RolloutWorker

log = logging.getLogger("orchestrator")


class RolloutGroup:
    def __init__(self, cfg, tokenizer, train_pg=None):
        r = cfg.stage.rollout
        self.pg = None
        remote = ray.remote(RolloutWorker)
        if r.placement == "colocated" and train_pg is not None:
            # Share the train workers' bundles: the CPU is time-shared; on GPU the train
            # actor holds most of the bundle's GPU and rollout the rest (same device).
            n = cfg.cluster.num_workers
            opts = [dict(num_cpus=0, num_gpus=cfg.cluster.gpus_per_worker * 0.25 if cfg.cluster.gpus_per_worker else 0,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(train_pg, placement_group_bundle_index=i))
                    for i in range(n)]
        else:
            n = r.num_workers
            bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
            self.pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=cfg.cluster.placement_timeout_s)
            except ray.exceptions.GetTimeoutError as exc:
                remove_placement_group(self.pg)
                from orchestrator.errors import ConfigError

                raise ConfigError(
                    f"could not place {n} rollout workers with {bundle} each beside the train workers "
                    f"within {cfg.cluster.placement_timeout_s}s; cluster has {ray.cluster_resources()}. "
                    "Lower stage.rollout.num_workers / its resources, or use "
                    "stage.rollout.placement=colocated.") from exc
            opts = [dict(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
                    for i in range(n)]
        self.actors = [remote.options(**o).remote(cfg, i, tokenizer) for i, o in enumerate(opts)]
        self.version = 0
        ray.get([a.update_weights.remote(0, {}) for a in self.actors])  # wait until built

    def _get(self, refs, what: str):
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise WorkerError(f"rollout {what} failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc

    def sync(self, version: int, state: Dict[str, Any]) -> Dict[str, float]:
        """Send new weights to every rollout actor; returns after all have them."""
        t = time.time()
        ref = ray.put(state)
        self._get([a.update_weights.remote(version, ref) for a in self.actors], "weight sync")
        self.version = version
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return {"time/sync": time.time() - t, "sync_mbytes": nbytes / 2**20}

    def generate(self, prompts: Sequence[List[int]], n: int, sampling: Dict[str, Any], seed: int) -> List[List[int]]:
        shards = [list(prompts[i::len(self.actors)]) for i in range(len(self.actors))]
        refs = [a.generate.remote(s, n, sampling, seed + i) for i, (a, s) in enumerate(zip(self.actors, shards)) if s]
        results = self._get(refs, "generation")
        for res in results:
            if res["version"] != self.version:
                raise RuntimeError(f"rollout generated with policy v{res['version']}, expected v{self.version}")
        # Re-interleave to the original prompt order (prompt i went to actor i % k).
        per_actor = [res["completions"] for res in results]
        out: List[List[int]] = []
        for i in range(len(prompts)):
            a, j = i % len(self.actors), i // len(self.actors)
            out.extend(per_actor[a][j * n:(j + 1) * n])
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)
