"""WorkerGroup: N actors of one class in a placement group, wired into torch.distributed.

The driver calls a method on every rank and gathers the results (`call`), or gives each
rank its own arguments (`call_per_rank`). A failed actor surfaces as WorkerError naming
its rank and node.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import ConfigError, WorkerError

log = logging.getLogger(__name__)


class WorkerGroup:
    def __init__(self, worker_cls: type, spec, env: Dict[str, str] | None = None,
                 colocate: "WorkerGroup | None" = None):
        """One actor per rank of the role `spec` (`orchestrator.roles.RoleSpec`), in a placement
        group of its own, or on the bundles of `colocate` (another role's group: the CPU is
        time-shared, and each takes its `gpu_share` of the bundle's GPU)."""
        c = spec.cluster
        self.name = spec.name
        self.world_size = c.num_workers
        self.owns_pg = colocate is None
        self.pg = self._placement(c) if colocate is None else colocate.pg
        remote = ray.remote(worker_cls)
        self.actors = [
            remote.options(
                num_cpus=c.cpus_per_worker if colocate is None else 0,
                num_gpus=c.gpus_per_worker * spec.gpu_share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                # ORCHESTRATOR_* variables of the driver reach every rank (actors inherit the
                # raylet's environment otherwise, not the driver's).
                runtime_env={"env_vars": {**{k: v for k, v in os.environ.items() if k.startswith("ORCHESTRATOR_")},
                                          **(env or {})}},
            ).remote(spec, r, c.num_workers)
            for r in range(c.num_workers)
        ]
        self.nodes = self.call("node_info")
        master = self.nodes[0]["ip"]
        port = ray.get(self.actors[0].free_port.remote())
        self.call("init_process_group", master, port)
        log.info("worker group %s: %d ranks on %d node(s), torch.distributed at %s:%d", self.name,
                 self.world_size, len({n["node_id"] for n in self.nodes}), master, port)

    def _placement(self, c):
        bundle = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}
        self._check_capacity(bundle, c.num_workers)
        pg = placement_group([dict(bundle) for _ in range(c.num_workers)], strategy=c.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=c.placement_timeout_s)
        except GetTimeoutError as exc:
            remove_placement_group(pg)
            raise ConfigError(
                f"could not place {c.num_workers} workers with {bundle} each "
                f"(strategy {c.placement_strategy}) within {c.placement_timeout_s}s; cluster has "
                f"{ray.cluster_resources()}. Lower cluster.num_workers or the per-worker resources, "
                "or use placement_strategy=PACK.") from exc
        return pg

    @staticmethod
    def _check_capacity(bundle: Dict[str, float], n: int) -> None:
        total = ray.cluster_resources()
        for res, amount in bundle.items():
            if amount * n > total.get(res, 0):
                raise ConfigError(
                    f"cluster.num_workers={n} needs {amount * n:g} {res} in total but the Ray cluster "
                    f"has {total.get(res, 0):g}. Lower cluster.num_workers or cluster.{res.lower()}s_per_worker.")

    def _gather(self, refs: Sequence[ray.ObjectRef], method: str) -> List[Any]:
        """Results in rank order; the first failure raises at once, even while other ranks
        are blocked in a collective waiting for the failed one."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except (RayActorError, RayTaskError) as exc:
                rank = list(refs).index(done[0])
                node = self.nodes[rank] if hasattr(self, "nodes") else {"ip": "?", "pid": "?"}
                cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause else exc
                text = str(cause).strip().splitlines()
                raise WorkerError(f"{method} failed on rank {rank} (node {node['ip']}, pid {node['pid']}): "
                                  f"{type(cause).__name__}: {text[-1] if text else ''}") from exc
        return ray.get(list(refs))

    def call(self, method: str, *args, **kwargs) -> List[Any]:
        return self._gather([getattr(a, method).remote(*args, **kwargs) for a in self.actors], method)

    def call_per_rank(self, method: str, per_rank_args: Sequence[Any], **kwargs) -> List[Any]:
        return self._gather([getattr(a, method).remote(arg, **kwargs)
                             for a, arg in zip(self.actors, per_rank_args)], method)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        if self.owns_pg:
            remove_placement_group(self.pg)


