"""RolloutGroup: places rollout actors, fans prompts out, syncs weights (versioned)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import ConfigError, WorkerError

# COLOCATED_GPU_SHARE lives beside the rollout interface, so that the stages read it without Ray.
from orchestrator.rollout.base import COLOCATED_GPU_SHARE, Completion, SamplingParams
from orchestrator.rollout.worker import RolloutWorker
from orchestrator.workers.group import current_call_timeout, dump_stacks

log = logging.getLogger("orchestrator")


class RolloutGroup:
    def __init__(self, rollout_cfg, model_spec, tokenizer, cluster, train_pg=None):
        """Rollout actors of the `rollout` config serving `model_spec`: on their own bundles,
        or (placement=colocated) one on each of the train workers' bundles (`train_pg`)."""
        r = self.cfg = rollout_cfg
        self.pg = None
        remote = ray.remote(RolloutWorker)
        if r.placement == "colocated" and train_pg is not None:
            # Share the train workers' bundles: the CPU is time-shared; on GPU the train
            # actor holds most of the bundle's GPU and rollout the rest (same device).
            n = cluster.num_workers
            gpus = cluster.gpus_per_worker * COLOCATED_GPU_SHARE if cluster.gpus_per_worker else 0
            opts = [
                dict(
                    num_cpus=0,
                    num_gpus=gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(train_pg, placement_group_bundle_index=i),
                )
                for i in range(n)
            ]
        else:
            n = r.num_workers
            bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
            self.pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=cluster.placement_timeout_s)
            except ray.exceptions.GetTimeoutError as exc:
                remove_placement_group(self.pg)
                raise ConfigError(
                    f"could not place {n} rollout workers with {bundle} each beside the train workers "
                    f"within {cluster.placement_timeout_s}s; cluster has {ray.cluster_resources()}. "
                    "Lower rollout.num_workers / its resources, or use "
                    "rollout.placement=colocated."
                ) from exc
            opts = [
                dict(
                    num_cpus=r.cpus_per_worker,
                    num_gpus=r.gpus_per_worker,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                )
                for i in range(n)
            ]
        self.actors = [remote.options(**o).remote(r, model_spec, i, tokenizer) for i, o in enumerate(opts)]
        self.version = 0
        self.nodes = ray.get([a.node_info.remote() for a in self.actors])
        self._get([a.update_weights.remote(0, {}) for a in self.actors], "start")  # wait until built

    def _get(self, refs, what: str):
        timeout = current_call_timeout()  # run.step_timeout_s: a hung rollout worker is a dead one
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            log.error("rollout %s: no result within %gs; stacks:\n%s", what, timeout, dump_stacks(self.nodes))
            raise WorkerError(f"rollout {what} hung for {timeout:g}s (run.step_timeout_s)") from exc
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise WorkerError(
                f"rollout {what} failed: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            ) from exc

    def sync(self, version: int, state: dict[str, Any]) -> dict[str, float]:
        """Send new weights (Hugging Face names) to every rollout actor; returns after all have them."""
        t = time.time()
        ref = ray.put(state)
        self._get([a.update_weights.remote(version, ref) for a in self.actors], "weight sync")
        self.version = version
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return {"time/sync": time.time() - t, "sync_mbytes": nbytes / 2**20}

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams, seed: int) -> list[Completion]:
        """`sampling.n` completions per prompt, grouped by prompt, in prompt order."""
        k = len(self.actors)
        shards = [list(prompts[i::k]) for i in range(k)]
        refs = [a.generate.remote(s, sampling, seed + i) for i, (a, s) in enumerate(zip(self.actors, shards)) if s]
        results = self._get(refs, "generation")
        for res in results:
            if res["version"] != self.version:
                raise RuntimeError(f"rollout generated with policy v{res['version']}, expected v{self.version}")
        # Re-interleave to the original prompt order (prompt i went to actor i % k).
        per_actor = [res["completions"] for res in results]
        n = sampling.n
        out: list[Completion] = []
        for i in range(len(prompts)):
            a, j = i % k, i // k
            out.extend(Completion(**c) for c in per_actor[a][j * n : (j + 1) * n])
        return out

    def sleep(self) -> None:
        """Colocated engines free accelerator memory for the train step (vLLM's sleep mode on
        GPU; a no-op elsewhere). A weight sync while asleep updates their host copy; the next
        generation wakes them."""
        if self.cfg.placement == "colocated":
            self._get([a.sleep.remote() for a in self.actors], "sleep")

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)
