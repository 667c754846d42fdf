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

from tests.launchers.conftest import entry, free_port_block, wait_for

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="sbatch is not on PATH: start the local test cluster with `bash slurm/ci_setup.sh` (CI's .ci/run does)",
    ),
]
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
def slurm_job():
    """Cancel whatever a failing test left queued or running."""
    ids: list = []
    yield ids
    for job_id in ids:
        if not finished(job_id):
            subprocess.run(["scancel", job_id], check=False)


@pytest.mark.slow
def test_submit_runs_on_two_nodes(tmp_path, capsys, slurm_job):
    run_dir = tmp_path / "run"
    rc = entry(
        "+experiment=sft_tiny",
        "debug=cpu",
        "logger=console",
        "checkpoint.export_hf=false",
        f"run.output_dir={run_dir}",
        "train.max_steps=4",
        "cluster=slurm",
        "cluster.nodes=2",
        "cluster.placement_strategy=STRICT_SPREAD",
        "cluster.time=15",
        f"cluster.ray_port={free_port_block(16)}",
    )
    assert rc == 0
    job_id, log = submitted(capsys.readouterr().out)
    slurm_job.append(job_id)
    assert log == run_dir / "launch" / f"slurm-{job_id}.out"

    state = wait_for(lambda: finished(job_id), 420, f"Slurm job {job_id}")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert job_info(job_id)["ExitCode"] == "0:0"
    assert "2 node(s) in the Ray cluster" in text and "run complete: 4 steps" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    assert len({w["node_id"] for w in summary["workers"]}) == 2  # head node and srun'd worker node
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()
    assert (run_dir / "launch" / "job.sbatch").is_file()
    assert (run_dir / "launch" / "resolved" / "config.yaml").is_file()
    assert wait_for(lambda: not own_ray_processes(job_id) or None, 30, "Ray of the job to stop", 1)


@pytest.mark.slow
def test_signal_checkpoints_requeues_and_resumes(tmp_path, capsys, slurm_job):
    """What happens before a time limit (`--signal=B:USR1@N`), sent now instead of waiting."""
    run_dir = tmp_path / "run"
    total = 60  # enough steps that the signal lands mid-run however fast the steps are
    rc = entry(
        "+experiment=sft_tiny",
        "debug=cpu",
        "logger=console",
        "checkpoint.export_hf=false",
        f"run.output_dir={run_dir}",
        f"train.max_steps={total}",
        "checkpoint.every_steps=1000",
        "cluster=slurm",
        "cluster.time=15",
        f"cluster.ray_port={free_port_block(16)}",
    )
    assert rc == 0
    job_id, log = submitted(capsys.readouterr().out)
    slurm_job.append(job_id)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 300, "2 steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

    state = wait_for(lambda: finished(job_id), 420, f"requeued Slurm job {job_id}")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert int(job_info(job_id)["Restarts"]) == 1
    assert "got SIGUSR1" in text and f"requeueing job {job_id}" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = summary["resumed_from"]
    assert 2 <= resumed < total and summary["steps"] == total
    assert f"resumed from {run_dir}/checkpoints/step_{resumed:08d}" in text
    assert (run_dir / "checkpoints" / f"step_{resumed:08d}").is_dir()  # written on the signal
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == total and sorted(set(steps)) == list(range(1, total + 1))


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
