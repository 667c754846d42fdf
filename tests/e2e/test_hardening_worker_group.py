"""WorkerGroup calls: a rank that hangs (a real actor sleeping forever in a method) is
detected within `call_timeout`, its Python stack is dumped with py-spy into the log, and a
WorkerError takes the driver's recovery path; a rank whose process died is reported rather
than its peers' collective errors; an error of ours raised in a worker (a full
disk while saving) propagates as itself, so the driver does not restart into it."""

from __future__ import annotations

import logging
import os
import time

import pytest
import ray

from orchestrator.errors import StorageError, WorkerError
from orchestrator.workers.group import WorkerGroup, call_timeout

pytestmark = pytest.mark.slow


class Rank:
    def __init__(self, rank: int):
        self.rank = rank

    def node_info(self) -> dict:
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def step(self, hang_rank: int) -> int:
        if self.rank == hang_rank:
            self.deadlocked_in_user_code()
        return self.rank

    def deadlocked_in_user_code(self) -> None:
        while True:
            time.sleep(1)

    def all_reduce(self, dead_rank: int) -> int:
        """As a collective when a peer's process dies: the dead rank's process exits after a
        moment; the others fail at once, as gloo does when a peer's socket closes."""
        if self.rank == dead_rank:
            time.sleep(0.5)
            os._exit(1)
        raise RuntimeError("[gloo] Connection closed by peer")

    def save(self, path: str) -> None:
        if self.rank == 1:
            raise StorageError(f"cannot write checkpoint step 4 in {path}: ENOSPC")


def _group(n: int = 2) -> WorkerGroup:
    """A WorkerGroup over plain actors (no placement group, no torch.distributed)."""
    g = WorkerGroup.__new__(WorkerGroup)
    g.actors = [ray.remote(num_cpus=0)(Rank).remote(r) for r in range(n)]
    g.nodes = ray.get([a.node_info.remote() for a in g.actors])
    return g


def test_a_hung_rank_is_detected_and_its_stack_dumped(ray_cluster, caplog):
    g = _group()
    try:
        assert g.call("step", -1) == [0, 1]  # no timeout in force: plain calls
        with call_timeout(None):
            assert g.call("step", -1) == [0, 1]
        t = time.time()
        with caplog.at_level(logging.ERROR), call_timeout(3), pytest.raises(WorkerError) as info:
            g.call("step", 1)
        assert time.time() - t < 60
        msg = str(info.value)
        assert f"step hung (rank 1: node {g.nodes[1]['ip']} pid {g.nodes[1]['pid']})" in msg
        assert "run.step_timeout_s=3s" in msg
        assert "--- rank 1" in caplog.text and "deadlocked_in_user_code" in caplog.text  # py-spy's dump
    finally:
        for a in g.actors:
            ray.kill(a)


def test_a_dead_rank_is_reported_not_its_peers_echo(ray_cluster):
    """A peer's collective error arrives before Ray reports the death: the report names the
    dead rank, whose process is the cause."""
    g = _group(3)
    try:
        with pytest.raises(WorkerError) as info:
            g.call("all_reduce", 2)
        assert str(info.value).startswith(f"all_reduce failed on rank 2 (node {g.nodes[2]['ip']}")
        assert "Connection closed by peer" not in str(info.value)
    finally:
        for a in g.actors:
            ray.kill(a)


def test_an_error_of_ours_in_a_worker_propagates_as_itself(ray_cluster):
    g = _group()
    try:
        with pytest.raises(StorageError, match="ENOSPC"):
            g.call("save", "/ckpts")
    finally:
        for a in g.actors:
            ray.kill(a)


OOM_SCRIPT = """
import os, sys, time
os.environ["RAY_memory_usage_threshold"] = "0.02"  # any real use is over it: the monitor kills
os.environ["RAY_memory_monitor_refresh_ms"] = "100"
import ray
from orchestrator.errors import WorkerOOMError
from orchestrator.workers.group import WorkerGroup

class Grower:
    def grow(self):
        chunks = [bytearray(50 << 20) for _ in range(4)]
        time.sleep(30)
        return len(chunks)

ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
g = WorkerGroup.__new__(WorkerGroup)
g.actors = [ray.remote(num_cpus=0, max_restarts=0)(Grower).remote()]
g.nodes = [{"ip": "?", "pid": "?"}]
try:
    g.call("grow")
except WorkerOOMError as exc:
    print("OOM:", exc)
    sys.exit(0)
sys.exit(3)
"""


def test_a_worker_killed_by_the_memory_monitor_is_reported_as_oom(tmp_path):
    """A real kill by Ray's memory monitor (its threshold lowered in a Ray of its own)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, "-c", OOM_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("OOM:")][0]
    assert "memory monitor" in line and "Memory on the node" in line and "Not restarting" in line
