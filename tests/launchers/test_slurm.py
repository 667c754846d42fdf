"""cluster=slurm against a real Slurm: the 2-node cluster `slurm/ci_setup.sh` starts on this
host (real slurmctld, slurmd, sbatch, srun, scontrol). Jobs run the tiny CPU recipe."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.launchers.conftest import entry, wait_for

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="sbatch is not on PATH: start the local test cluster with `bash slurm/ci_setup.sh` (CI's .ci/run does)",
    ),
]
URGENT = "urgent"  # slurm/ci_setup.sh: its jobs preempt those of the default partition
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def submitted(out: str) -> tuple[str, Path]:
    job_id = re.search(r"submitted Slurm job (\d+)", out).group(1)
    log = Path(re.search(r"follow:\s+tail -f (\S+)", out).group(1))
    return job_id, log


def finished(job_id: str):
    state = job_info(job_id).get("JobState")
    return state if state in DONE else None


def own_ray_processes(job_id: str) -> list:
    """Processes of this job's Ray cluster (its temp dir names the job)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(f"ray-{job_id}-" in part for part in (p.info["cmdline"] or [])):
            found.append(p.pid)
    return found


@pytest.fixture
def slurm_job(monkeypatch):
    """Cancel whatever a failing test left queued or running. Jobs run with Ray's token auth
    on (the job script's default; tests/conftest.py disables it for its own cluster only)."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    ids: list = []
    yield ids
    for job_id in ids:
        if not finished(job_id):
            subprocess.run(["scancel", job_id], check=False)


TINY_JOB = ["+experiment=sft_tiny", "debug=cpu", "logger=console", "checkpoint.export_hf=false", "cluster=slurm"]
# What a finished or stopped job's log must not show (issue: Ray torn down by signals).
ALARMS = ("srun: error", "CANCELLED", "Killed", "Traceback", "exited unexpectedly")


def submit(capsys, run_dir: Path, *overrides: str) -> tuple[str, Path]:
    """`python -m orchestrator ... cluster=slurm` in-process; the job id and its log."""
    assert entry(*TINY_JOB, f"run.output_dir={run_dir}", "cluster.time=30", *overrides) == 0
    job_id, log = submitted(capsys.readouterr().out)
    assert log == run_dir / "launch" / f"slurm-{job_id}.out"
    return job_id, log


def logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def wait_steps(run_dir: Path, after: int, what: str) -> int:
    """Until a step beyond `after` is logged; that step."""
    return wait_for(lambda: max(logged_steps(run_dir), default=0) > after and logged_steps(run_dir)[-1], 600, what)


def restarted(job_id: str, count: int) -> bool:
    info = job_info(job_id)
    return int(info.get("Restarts", 0)) >= count and info.get("JobState") == "RUNNING"


@pytest.mark.slow
def test_two_jobs_share_a_node_on_free_ports(tmp_path, capsys, slurm_job):
    """A 2-node job and a 1-node job at the same time: on this host every Slurm node is the
    same machine, so both Ray clusters share it, each on ports picked when it starts (Ray's
    fixed defaults would collide). Both finish cleanly, Ray stopped without error lines."""
    runs = {"two": tmp_path / "two", "one": tmp_path / "one"}
    jobs = {
        "two": submit(
            capsys, runs["two"], "train.max_steps=4", "cluster.nodes=2", "cluster.placement_strategy=STRICT_SPREAD"
        ),
        "one": submit(capsys, runs["one"], "train.max_steps=4", "cluster.num_workers=1"),
    }
    slurm_job.extend(job_id for job_id, _ in jobs.values())
    wait_for(lambda: all(job_info(j).get("JobState") == "RUNNING" for j, _ in jobs.values()), 120, "both jobs to run")
    for job_id, log in jobs.values():
        state = wait_for(lambda j=job_id: finished(j), 600, f"Slurm job {job_id}")
        text = log.read_text()
        assert state == "COMPLETED" and job_info(job_id)["ExitCode"] == "0:0", text[-3000:]
        assert "run complete: 4 steps" in text and "driver exited with 0" in text
        assert not [alarm for alarm in ALARMS if alarm in text], text[-3000:]
        assert wait_for(lambda j=job_id: not own_ray_processes(j) or None, 30, "Ray of the job to stop", 1)
        assert (log.parent / "ray_auth_token").stat().st_mode & 0o077 == 0  # token auth, the token private
    heads = [re.search(r"Ray head (\S+)", log.read_text()).group(1) for _, log in jobs.values()]
    assert heads[0] != heads[1] and not any(h.endswith(":6379") for h in heads)
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert len({w["node_id"] for w in summary["workers"]}) == 2  # head node and srun'd worker node
    first, second = (job_info(j) for j, _ in jobs.values())
    assert first["StartTime"] < second["EndTime"] and second["StartTime"] < first["EndTime"]  # they overlapped


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_stop_checkpoints_and_requeues_as_its_cause_requires(tmp_path, capsys, slurm_job):
    """One 2-node job, stopped three ways, each with a checkpoint of the step it was in:
    SIGUSR1 to the script (what `--signal=B:USR1@N` sends before the time limit): the script
    requeues the job; preemption by a job of a higher-priority partition (SIGTERM to every
    process of both steps): Slurm requeues it; a plain `scancel` (SIGTERM to every process):
    cancelled, not requeued. Each restart resumes from the checkpoint of the stop before."""
    run_dir = tmp_path / "run"
    job_id, log = submit(
        capsys,
        run_dir,
        "train.max_steps=5000",
        "checkpoint.every_steps=100000",
        "checkpoint.keep_last=3",  # the three stops' checkpoints are all checked at the end
        "cluster.nodes=2",
        "cluster.placement_strategy=STRICT_SPREAD",
    )
    slurm_job.append(job_id)

    def stopped_at(restarts: int) -> int:
        """The step checkpointed by the stop that led to restart `restarts`, once resumed."""

        def resumes() -> list[str]:
            return re.findall(rf"resumed from {run_dir}/checkpoints/step_(\d+)", log.read_text())

        wait_for(lambda: restarted(job_id, restarts) and len(resumes()) >= restarts, 600, f"restart {restarts}")
        return int(resumes()[-1])

    step = wait_steps(run_dir, 1, "2 steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    planned = stopped_at(1)
    assert planned >= step and f"preempted: checkpoint at step {planned}, requeued" in log.read_text()

    step = wait_steps(run_dir, planned + 1, "2 steps after the resume")
    hosts = subprocess.run(["scontrol", "show", "hostnames", job_info(job_id)["NodeList"]], capture_output=True)
    node = hosts.stdout.decode().split()[-1]  # the srun'd Ray worker's node: preempts the whole job
    urgent = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--partition={URGENT}",
            f"--nodelist={node}",
            "--cpus-per-task=2",
            "--output=/dev/null",
            "--wrap=sleep 1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    slurm_job.append(urgent)
    preempted = stopped_at(2)
    assert preempted >= step and f"preempted: checkpoint at step {preempted}, requeued" in log.read_text()

    step = wait_steps(run_dir, preempted + 1, "2 steps after the second resume")
    subprocess.run(["scancel", job_id], check=True)  # no --batch: SIGTERM to every process
    assert wait_for(lambda: finished(job_id), 300, "the cancelled job to end") == "CANCELLED"
    text = log.read_text()
    cancelled = logged_steps(run_dir)[-1]
    assert cancelled >= step and int(job_info(job_id)["Restarts"]) == 2
    assert f"stopped by SIGTERM: checkpoint at step {cancelled}; submit the job again" in text
    for at in (planned, preempted, cancelled):  # each stop saved the step it was in
        assert (run_dir / "checkpoints" / f"step_{at:08d}" / "manifest.json").is_file()
    assert "received SIGUSR1" in text and text.count("received SIGTERM") >= 2
    assert "] error:" not in text  # the driver's planned stops say `stopped by ...`, never `error:`
    assert not [alarm for alarm in ("srun: error", "Traceback", "exited unexpectedly") if alarm in text], text[-4000:]
    assert wait_for(lambda: not own_ray_processes(job_id) or None, 60, "Ray of the job to stop", 1)


def test_gpus_on_a_partition_without_them(tiny, capsys):
    overrides, run_dir = tiny
    rc = entry(*overrides, "cluster=slurm", "cluster.gpus_per_node=1", "cluster.num_workers=1")
    assert rc == 2
    err = capsys.readouterr().err
    assert "cluster.gpus_per_node=1 but partition" in err and "has no GPUs" in err
    assert not (run_dir / "launch").exists()  # nothing rendered or submitted


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.partition=nosuch", "cluster.partition='nosuch' does not exist on this Slurm cluster"),
        ("cluster.nodes=64", "cluster.nodes=64 but partition"),
        ("cluster.cpus_per_node=4096", "4096 CPUs per node asked for"),
    ],
)
def test_allocation_that_does_not_fit_the_partition(tiny, capsys, override, message):
    overrides, _ = tiny
    assert entry(*overrides, "cluster=slurm", override) == 2
    assert message in capsys.readouterr().err
