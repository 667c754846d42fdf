"""WorkerGroup: N actors of one class in a placement group, wired into torch.distributed.

The driver calls a method on every rank and gathers the results (`call`), or gives each
rank its own arguments (`call_per_rank`). A failed actor surfaces as WorkerError naming
its rank and node.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import ray
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import ConfigError, OrchestratorError, WorkerError, WorkerOOMError

log = logging.getLogger(__name__)


class WorkerGroup:
    def __init__(self, worker_cls: type, spec, env: dict[str, str] | None = None, colocate: WorkerGroup | None = None):
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
                runtime_env={
                    "env_vars": {
                        **{k: v for k, v in os.environ.items() if k.startswith("ORCHESTRATOR_")},
                        **(env or {}),
                    }
                },
            ).remote(spec, r, c.num_workers)
            for r in range(c.num_workers)
        ]
        self.nodes = self.call("node_info")
        master = self.nodes[0]["ip"]
        port = ray.get(self.actors[0].free_port.remote())
        self.call("init_process_group", master, port)
        log.info(
            "worker group %s: %d ranks on %d node(s), torch.distributed at %s:%d",
            self.name,
            self.world_size,
            len({n["node_id"] for n in self.nodes}),
            master,
            port,
        )

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
                "or use placement_strategy=PACK."
            ) from exc
        return pg

    @staticmethod
    def _check_capacity(bundle: dict[str, float], n: int) -> None:
        total = ray.cluster_resources()
        for res, amount in bundle.items():
            if amount * n > total.get(res, 0):
                raise ConfigError(
                    f"cluster.num_workers={n} needs {amount * n:g} {res} in total but the Ray cluster "
                    f"has {total.get(res, 0):g}. Lower cluster.num_workers or cluster.{res.lower()}s_per_worker."
                )

    def _gather(self, refs: Sequence[ray.ObjectRef], method: str) -> list[Any]:
        """Results in rank order; the first failure raises at once, even while other ranks
        are blocked in a collective waiting for the failed one. An error of ours raised in a
        worker (StorageError, ConfigError, ...) propagates as itself: restarting would not
        help. Inside `call_timeout(s)`, ranks with no result after s seconds are hung: their
        stacks are logged and WorkerError is raised (the driver's recovery path)."""
        refs = list(refs)
        pending = list(refs)
        timeout_s = _CALL_TIMEOUT_S.get()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                stuck = [refs.index(r) for r in pending]
                nodes = [self.nodes[r] if hasattr(self, "nodes") else {} for r in stuck]
                log.error(
                    "%s: rank(s) %s gave no result within %gs (run.step_timeout_s); their stacks:\n%s",
                    method,
                    stuck,
                    timeout_s,
                    dump_stacks(nodes),
                )
                where = ", ".join(
                    f"rank {r}: node {n.get('ip', '?')} pid {n.get('pid', '?')}" for r, n in zip(stuck, nodes)
                )
                raise WorkerError(
                    f"{method} hung ({where}): no result within run.step_timeout_s={timeout_s:g}s; "
                    "their Python stacks are in the log"
                )
            try:
                ray.get(done[0])
            except OutOfMemoryError as exc:
                raise _oom_error(method, refs.index(done[0]), exc) from exc
            except (RayActorError, RayTaskError) as exc:
                rank = refs.index(done[0])
                cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause else exc
                if isinstance(cause, OrchestratorError) and not isinstance(cause, WorkerError):
                    raise cause from None
                if not isinstance(exc, RayActorError) and pending:
                    dead = _dead_rank(refs, pending)  # the cause, when this error is its echo
                    if dead is not None:
                        rank, exc = dead
                        cause = exc
                node = self.nodes[rank] if hasattr(self, "nodes") else {"ip": "?", "pid": "?"}
                text = str(cause).strip().splitlines()
                raise WorkerError(
                    f"{method} failed on rank {rank} (node {node['ip']}, pid {node['pid']}): "
                    f"{type(cause).__name__}: {text[-1] if text else ''}"
                ) from exc
        return ray.get(refs)

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        return self._gather([getattr(a, method).remote(*args, **kwargs) for a in self.actors], method)

    def call_per_rank(self, method: str, per_rank_args: Sequence[Any], **kwargs) -> list[Any]:
        return self._gather(
            [getattr(a, method).remote(arg, **kwargs) for a, arg in zip(self.actors, per_rank_args)], method
        )

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        if self.owns_pg:
            remove_placement_group(self.pg)


_CALL_TIMEOUT_S: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("call_timeout_s", default=None)


DEAD_PEER_GRACE_S = 10.0
"""How long a rank's error waits for the other ranks to show a dead process (see `_dead_rank`)."""


def _dead_rank(refs: list, pending: list) -> Optional[tuple[int, RayActorError]]:
    """A rank among `pending` whose process died, found within `DEAD_PEER_GRACE_S`. When a
    worker process dies, its peers' collectives fail at once ("connection closed by peer"),
    often before Ray reports the death: the dead rank is the error to report, not its echo."""
    deadline = time.monotonic() + DEAD_PEER_GRACE_S
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            return None
        try:
            ray.get(done[0])
        except RayActorError as exc:
            return refs.index(done[0]), exc
        except Exception:  # another echo, or a result: not the dead one
            continue
    return None


@contextlib.contextmanager
def call_timeout(seconds: Optional[float]) -> Iterator[None]:
    """Within the block, every WorkerGroup call that has no result from some rank after
    `seconds` raises WorkerError after logging the stuck ranks' stacks (None: wait forever).
    The driver wraps each step: `with call_timeout(cfg.run.step_timeout_s): stage.step(...)`."""
    token = _CALL_TIMEOUT_S.set(seconds)
    try:
        yield
    finally:
        _CALL_TIMEOUT_S.reset(token)


def current_call_timeout() -> float | None:
    """The timeout `call_timeout` set for worker calls here (None: none), for other gathers
    (e.g. the rollout group's) to honour it the same way."""
    return _CALL_TIMEOUT_S.get()


def _py_spy_dump(pid: int) -> str:
    exe = shutil.which("py-spy")
    if exe is None:
        return "(py-spy is not installed on this node: no stack)"
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "(py-spy dump timed out)"
    return (out.stdout + out.stderr).strip() or f"(py-spy exited with {out.returncode})"


def dump_stacks(nodes: Sequence[dict[str, Any]], timeout_s: float = 60.0) -> str:
    """The Python stacks of worker processes (`node_info()` dicts: pid, node_id, ip), taken with
    `py-spy dump` on each process's own node (a zero-CPU Ray task pinned there)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    dump = ray.remote(num_cpus=0)(_py_spy_dump)
    refs = [
        dump.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False)).remote(n["pid"])
        if n.get("node_id") and n.get("pid")
        else None
        for n in nodes
    ]
    parts = []
    for n, ref in zip(nodes, refs):
        try:
            text = ray.get(ref, timeout=timeout_s) if ref is not None else "(unknown process)"
        except Exception as exc:  # noqa: BLE001  (the node may be gone too: say so, go on)
            text = f"(no stack: {type(exc).__name__}: {exc})"
        parts.append(f"--- rank {n.get('rank', '?')} (node {n.get('ip', '?')}, pid {n.get('pid', '?')}) ---\n{text}")
    return "\n".join(parts)


def _oom_error(method: str, rank: int, exc: Exception) -> WorkerOOMError:
    """Ray's memory-monitor kill as one message: the node and the memory figures Ray gives."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    figures = next((ln for ln in lines if ln.startswith("Memory on the node")), lines[0] if lines else "")
    return WorkerOOMError(
        f"{method} on rank {rank}: the worker was killed by Ray's memory monitor: the node ran out of memory "
        f"({figures}). Not restarting, a restart would hit the same limit: lower train.micro_batch_size or "
        "data.max_seq_len, set backend.activation_checkpointing=true, offload optimizer state "
        "(backend=deepspeed_zero3 backend.offload_optimizer=cpu), or use nodes with more memory."
    )
