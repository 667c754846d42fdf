"""The preStop hooks of the KubeRay pods (launchers/pod_stop.py) against a real run.

No Kubernetes here: a pod's own process table is reproduced with a PID namespace of its own
(`unshare --pid --fork --mount-proc`, needs root), where a real run trains (cluster=local,
tiny recipe: the driver and its Ray actors). In the order a deleted RayJob brings them: the
worker pod's hook waits while the run's actors live; the head pod's hook sends the driver
SIGTERM, the driver checkpoints after its current step and exits 143, the actors end and
both hooks return. What kubelet then does (SIGTERM, SIGKILL at the grace period) is not run."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launchers.conftest import TINY


def in_pid_namespace(script: str, timeout: float) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.skip("`unshare` (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no PID namespace for this user ({probe.stderr.decode().strip()}): the hooks need a pod's view")
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[2])


def test_hooks_return_at_once_when_the_job_is_over():
    hooks = f"{sys.executable} -m launchers.pod_stop head --timeout=60 && {sys.executable} -m launchers.pod_stop worker"
    done = in_pid_namespace(f"time ({hooks})", 120)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    assert "real\t0m" in done.stderr  # well under a minute: nothing to wait for


@pytest.mark.slow
def test_hooks_stop_a_running_driver_after_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run = [*TINY, f"run.output_dir={run_dir}", "train.max_steps=5000", "checkpoint.every_steps=100000"]
    py = sys.executable
    script = f"""
{py} -m orchestrator {shlex.join(run)} > {tmp_path}/driver.log 2>&1 &
DRIVER=$!
until [ "$(wc -l < {run_dir}/metrics.jsonl 2>/dev/null || echo 0)" -ge 2 ]; do
  kill -0 $DRIVER || exit 9
  sleep 1
done
{py} -m launchers.pod_stop worker --timeout=240 &
WORKER=$!
sleep 3
kill -0 $WORKER || exit 8   # the worker hook must wait while the actors run
{py} -m launchers.pod_stop head --timeout=240; echo "head hook: $?"
wait $DRIVER; echo "driver: $?"
wait $WORKER; echo "worker hook: $?"
"""
    done = in_pid_namespace(script, 540)
    driver_log = (tmp_path / "driver.log").read_text() if (tmp_path / "driver.log").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + driver_log[-3000:]
    assert "head hook: 0\ndriver: 143\nworker hook: 0" in done.stdout, done.stdout + driver_log[-3000:]
    assert "pod_stop: waiting for 2 actor process(es) of the job to end" in done.stdout
    assert "pod_stop: SIGTERM to the driver" in done.stdout
    step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file(), driver_log[-3000:]
    assert "received SIGTERM: checkpointing after the current step" in driver_log
