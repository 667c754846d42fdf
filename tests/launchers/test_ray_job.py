"""cluster=ray_job against a real Ray cluster: `ray start --head` with the Jobs API (dashboard)
plus a worker node, on free ports and their own temp dirs (other Ray clusters share this
host); only the processes this module starts are stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import ray_job
from tests.launchers.conftest import TINY, entry, free_port_block, wait_for

RAY = str(Path(sys.executable).parent / "ray")


def _ports(base: int) -> list:
    return [
        f"--ray-client-server-port={base + 1}",
        f"--dashboard-agent-listen-port={base + 2}",
        f"--dashboard-agent-grpc-port={base + 3}",
        f"--runtime-env-agent-port={base + 4}",
        f"--metrics-export-port={base + 5}",
    ]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-node Ray cluster with the Jobs API; yields the dashboard address."""
    tmp = tmp_path_factory.mktemp("rayjob")
    base = free_port_block(24)
    common = ["--block", "--disable-usage-stats", "--num-cpus=2"]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            f"--port={base}",
            *_ports(base),
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={base + 6}",
            f"--temp-dir={tmp}/h",
            *common,
        ],
        stdout=open(tmp / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    procs = [head]
    address = f"http://127.0.0.1:{base + 6}"
    try:
        wait_for(lambda: _reachable(address), 120, "the Ray head's Jobs API")
        procs.append(
            subprocess.Popen(
                [RAY, "start", f"--address=127.0.0.1:{base}", *_ports(base + 12), f"--temp-dir={tmp}/w", *common],
                stdout=open(tmp / "worker.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(lambda: _alive_nodes(address) >= 2, 120, "the worker node to join")
        yield address
    finally:
        # `ray start --block` stops the processes it started on SIGTERM.
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def _reachable(address: str) -> bool:
    try:
        ray_job.client(address)
        return True
    except Exception:
        return False


def _alive_nodes(address: str) -> int:
    from ray.util.state import list_nodes

    return sum(n.state == "ALIVE" for n in list_nodes(address=address))


def status(address: str, job_id: str) -> str:
    return str(ray_job.client(address).get_job_status(job_id).value)


@pytest.mark.slow
def test_submit_stop_and_resume(ray_head, tmp_path, capsys):
    """Submit, follow the printed commands, stop (the driver checkpoints), submit the same
    config again with cluster.follow=true: it resumes and finishes on both nodes."""
    run_dir = tmp_path / "run"
    common = [
        *TINY,
        f"run.output_dir={run_dir}",
        "cluster=ray_job",
        f"cluster.address={ray_head}",
        "cluster.placement_strategy=STRICT_SPREAD",
        "checkpoint.every_steps=1000",
        "+cluster.env.ORCH_TEST_MARK=from-submitter",
    ]
    assert entry(*common, "train.max_steps=200", "cluster.submission_id=rj-first") == 0
    out = capsys.readouterr().out
    assert "submitted Ray job rj-first" in out
    assert f"python -m launchers.ray_job logs rj-first --follow --address {ray_head}" in out

    info = ray_job.client(ray_head).get_job_info("rj-first")
    renv = info.runtime_env
    assert renv["env_vars"]["ORCH_TEST_MARK"] == "from-submitter"
    assert len(renv["py_modules"]) == 2 and renv["working_dir"].startswith("gcs://")

    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 240, "2 steps")
    assert ray_job.main(["stop", "rj-first", "--address", ray_head]) == 0
    wait_for(lambda: status(ray_head, "rj-first") == "STOPPED", 120, "the job to stop")
    stopped_at = len(metrics.read_text().splitlines())
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()  # the SIGTERM checkpoint

    capsys.readouterr()
    assert ray_job.main(["status", "rj-first", "--address", ray_head]) == 0
    assert "rj-first: STOPPED" in capsys.readouterr().out
    assert ray_job.main(["logs", "rj-first", "--address", ray_head]) == 0
    assert "checkpointing after the current step" in capsys.readouterr().out

    total = stopped_at + 2
    assert entry(*common, f"train.max_steps={total}", "cluster.submission_id=rj-second", "cluster.follow=true") == 0
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d}" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == stopped_at and summary["steps"] == total
    assert len({w["node_id"] for w in summary["workers"]}) == 2


def test_following_a_failed_job_fails(ray_head, capsys):
    """`cluster.follow=true` streams the logs and turns a failed job into a failed command
    (a plain entrypoint here: the launcher's part is the same for any job)."""
    from orchestrator.errors import OrchestratorError

    jobs = ray_job.client(ray_head)
    job_id = jobs.submit_job(entrypoint="echo about to fail; exit 3")
    with pytest.raises(OrchestratorError, match=rf"Ray job {job_id} ended FAILED"):
        ray_job.follow(jobs, job_id)
    assert "about to fail" in capsys.readouterr().out


def test_unknown_job_id(ray_head, capsys):
    assert ray_job.main(["status", "no-such-job", "--address", ray_head]) == 1
    assert "no-such-job" in capsys.readouterr().err


def test_unreachable_address(tiny, capsys):
    overrides, run_dir = tiny
    port = free_port_block(1)
    assert entry(*overrides, "cluster=ray_job", f"cluster.address=http://127.0.0.1:{port}") == 2
    assert f"cannot reach the Ray Jobs API at cluster.address='http://127.0.0.1:{port}'" in capsys.readouterr().err
    assert not (run_dir / "launch").exists()


def test_cli_needs_a_command():
    proc = subprocess.run(
        [sys.executable, "-m", "launchers.ray_job"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"},
    )
    assert proc.returncode == 2 and "status,logs,stop" in proc.stderr
