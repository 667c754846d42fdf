"""cluster=ray with a wrong address fails within a bounded time with our message (Ray alone
retries for many minutes): nothing listening, something that is not Ray listening, and the
positive control of a real cluster."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _entry(*overrides: str, timeout_s: float, tmp_path) -> subprocess.CompletedProcess:
    """The real entry in a subprocess (no Ray session yet), with the connect timeout lowered."""
    code = "import sys; from orchestrator.__main__ import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "+experiment=sft_tiny",
            "logger=console",
            f"run.output_dir={tmp_path / 'run'}",
            "cluster=ray",
            f"cluster.connect_timeout_s={timeout_s}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_wrong_ray_address_fails_fast_with_our_message(tmp_path):
    t = time.time()
    out = _entry("cluster.address=127.0.0.1:1", timeout_s=4, tmp_path=tmp_path)
    took = time.time() - t
    assert out.returncode == 2, out.stderr[-2000:]
    assert took < 60, took  # the connect itself is bounded by the timeout; the rest is imports
    assert "cannot reach a Ray cluster at cluster.address='127.0.0.1:1'" in out.stderr
    assert "ray start --head" in out.stderr and "cluster=local" in out.stderr
    assert "waiting up to 4s" in out.stderr  # one waiting line, not Ray's retry lines
    assert "Failed to connect to GCS" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_port_that_is_not_ray_fails_within_a_bound(tmp_path):
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    threading.Thread(target=lambda: [server.accept() for _ in iter(int, 1)], daemon=True).start()
    port = server.getsockname()[1]
    try:
        t = time.time()
        out = _entry(f"cluster.address=127.0.0.1:{port}", timeout_s=3, tmp_path=tmp_path)
        assert out.returncode == 2, out.stderr[-2000:]
        assert time.time() - t < 90
        assert "no Ray GCS answered" in out.stderr and "cluster=local" in out.stderr
    finally:
        server.close()


def test_connect_attaches_to_a_running_cluster(ray_cluster):
    code = (
        "import sys, ray, launchers.ray_cluster as r; r.connect(sys.argv[1], 10); "
        "print('CPUS', ray.cluster_resources()['CPU']); ray.shutdown()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ray_cluster.address],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CPUS 4.0" in out.stdout
