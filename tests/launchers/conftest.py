"""Helpers for the launcher tests: the real entry in-process, free ports, polling, and one
real Ray cluster with token authentication on (a head with the Jobs API and a worker node)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import requests

# KubeRay's CRDs (ray.io_rayjobs.yaml, ...): where KUBERAY_CRDS points, else where this test
# environment keeps them, beside the checkout. Tests that need them skip when absent.
KUBERAY_CRDS = Path(os.environ.get("KUBERAY_CRDS") or Path(__file__).resolve().parents[3] / "shared" / "k8s")
TINY = ["+experiment=sft_tiny", "debug=cpu", "logger=console", "checkpoint.export_hf=false"]


def entry(*args: str) -> int:
    from orchestrator.__main__ import main

    return main(list(args))


def free_port_block(size: int, start: int = 20000, stop: int = 30000) -> int:
    """A base port with `size` consecutive free ports (other Ray clusters run on this host)."""
    for base in range(start, stop, size):
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def wait_for(check: Callable[[], Optional[object]], timeout: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def tiny(tmp_path) -> tuple[list[str], Path]:
    run_dir = tmp_path / "run"
    return [*TINY, f"run.output_dir={run_dir}"], run_dir


RAY = str(Path(sys.executable).parent / "ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def ray_ports(base: int) -> list[str]:
    return [
        f"--ray-client-server-port={base + 1}",
        f"--dashboard-agent-listen-port={base + 2}",
        f"--dashboard-agent-grpc-port={base + 3}",
        f"--runtime-env-agent-port={base + 4}",
        f"--metrics-export-port={base + 5}",
    ]


@dataclass
class RayHead:
    """A running Ray cluster with token auth on: its Jobs API and GCS addresses and token."""

    address: str
    """Jobs API (dashboard): http://127.0.0.1:PORT."""
    gcs: str
    """GCS: 127.0.0.1:PORT (cluster=ray)."""
    token_path: Path

    def env(self, **auth: str) -> dict[str, str]:
        """This process's environment for a client subprocess, with only the given Ray auth
        variables set (RAY_AUTH_MODE=disabled from tests/conftest.py removed) and an empty
        HOME, so that no ~/.ray/auth_token of this machine is found."""
        env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
        home = self.token_path.parent / "empty-home"
        home.mkdir(exist_ok=True)
        return {**env, "HOME": str(home), **auth}

    def use_token(self, monkeypatch) -> None:
        """This process presents the cluster's token (as a user with RAY_AUTH_TOKEN_PATH set)."""
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(self.token_path))


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=2", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _get(head: RayHead, path: str) -> Optional[requests.Response]:
    """GET from the head's dashboard with its token; None while it does not answer."""
    token = head.token_path.read_text().strip()
    try:
        return requests.get(f"{head.address}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    except requests.RequestException:
        return None


def _nodes_alive(head: RayHead) -> int:
    reply = _get(head, "/nodes?view=summary")
    try:
        return sum(n["raylet"]["state"] == "ALIVE" for n in reply.json()["data"]["summary"])
    except (AttributeError, ValueError, KeyError, TypeError):
        return 0


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    """`ray start --head` (with the Jobs API) and a worker node, on free ports with their own
    temp dirs (other Ray clusters share this host), started the way a user starts them: no
    RAY_AUTH_MODE, a token on the head (RAY_AUTH_TOKEN_PATH), so Ray turns token auth on.
    Only the processes started here are stopped."""
    tmp = tmp_path_factory.mktemp("rayhead")
    base = free_port_block(24)
    head = RayHead(f"http://127.0.0.1:{base + 6}", f"127.0.0.1:{base}", tmp / "token")
    head.token_path.write_text(secrets.token_hex(32))
    env = head.env(RAY_AUTH_TOKEN_PATH=str(head.token_path))
    dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={base + 6}"]
    procs = [
        _start(["--head", f"--port={base}", *ray_ports(base), *dashboard, f"--temp-dir={tmp}/h"], env, tmp / "head.log")
    ]
    try:
        wait_for(lambda: (r := _get(head, "/api/version")) is not None and r.ok, 420, "the Ray head's Jobs API")
        unauthenticated = requests.get(f"{head.address}/api/jobs/", timeout=10)
        assert unauthenticated.status_code == 401, "the head must run with token auth on"
        procs.append(
            # A node joining a cluster with token auth runs in token mode (a plain `ray start
            # --address` defaults to disabled and is refused by the head's GCS).
            _start(
                [f"--address={head.gcs}", *ray_ports(base + 12), f"--temp-dir={tmp}/w"],
                {**env, "RAY_AUTH_MODE": "token"},
                tmp / "worker.log",
            )
        )
        wait_for(lambda: _nodes_alive(head) >= 2, 420, "the worker node to join")
        yield head
    finally:
        for p in reversed(procs):  # `ray start --block` stops the processes it started on SIGTERM
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
