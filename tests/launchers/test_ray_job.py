"""cluster=ray_job against a real Ray cluster with token authentication on: `ray start --head`
with the Jobs API (dashboard) plus a worker node (tests/launchers/conftest.py::ray_head).
These tests present the cluster's token as a user would (RAY_AUTH_TOKEN_PATH); what happens
without it is in test_ray_auth.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launchers import ray_job
from tests.launchers.conftest import TINY, entry, free_port_block, wait_for


def status(address: str, job_id: str) -> str:
    return str(ray_job.client(address).get_job_status(job_id).value)


@pytest.fixture
def address(ray_head, monkeypatch) -> str:
    ray_head.use_token(monkeypatch)
    return ray_head.address


@pytest.mark.slow
def test_submit_stop_and_resume(address, tmp_path, capsys):
    """Submit, follow the printed commands, stop (the driver checkpoints), submit the same
    config again with cluster.follow=true: it resumes and finishes on both nodes. The job's
    driver attaches to the cluster (cluster.address=auto) with the head's token."""
    run_dir = tmp_path / "run"
    common = [
        *TINY,
        f"run.output_dir={run_dir}",
        "cluster=ray_job",
        f"cluster.address={address}",
        "cluster.placement_strategy=STRICT_SPREAD",
        "checkpoint.every_steps=1000",
        "+cluster.env.ORCH_TEST_MARK=from-submitter",
    ]
    assert entry(*common, "train.max_steps=200", "cluster.submission_id=rj-first") == 0
    out = capsys.readouterr().out
    assert "submitted Ray job rj-first" in out
    assert f"python -m launchers.ray_job logs rj-first --follow --address {address}" in out

    info = ray_job.client(address).get_job_info("rj-first")
    renv = info.runtime_env
    assert renv["env_vars"]["ORCH_TEST_MARK"] == "from-submitter"
    assert len(renv["py_modules"]) == 2 and renv["working_dir"].startswith("gcs://")

    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 240, "2 steps")
    assert ray_job.main(["stop", "rj-first", "--address", address]) == 0
    wait_for(lambda: status(address, "rj-first") == "STOPPED", 120, "the job to stop")
    stopped_at = len(metrics.read_text().splitlines())
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()  # the SIGTERM checkpoint

    capsys.readouterr()
    assert ray_job.main(["status", "rj-first", "--address", address]) == 0
    assert "rj-first: STOPPED" in capsys.readouterr().out
    assert ray_job.main(["logs", "rj-first", "--address", address]) == 0
    assert "checkpointing after the current step" in capsys.readouterr().out

    total = stopped_at + 2
    assert entry(*common, f"train.max_steps={total}", "cluster.submission_id=rj-second", "cluster.follow=true") == 0
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d}" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == stopped_at and summary["steps"] == total
    assert len({w["node_id"] for w in summary["workers"]}) == 2


def test_following_a_failed_job_fails(address, capsys):
    """`cluster.follow=true` streams the logs and turns a failed job into a failed command
    (a plain entrypoint here: the launcher's part is the same for any job)."""
    from orchestrator.errors import OrchestratorError

    jobs = ray_job.client(address)
    job_id = jobs.submit_job(entrypoint="echo about to fail; exit 3")
    with pytest.raises(OrchestratorError, match=rf"Ray job {job_id} ended FAILED"):
        ray_job.follow(jobs, job_id)
    assert "about to fail" in capsys.readouterr().out


def test_unknown_job_id(address, capsys):
    assert ray_job.main(["status", "no-such-job", "--address", address]) == 1
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
