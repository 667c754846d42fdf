"""Launchers run the plan before submitting: a run that cannot fit stops with the table."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.__main__ import main
from orchestrator.config.compose import compose
from orchestrator.errors import ConfigError

TINY = ["+experiment=sft_tiny", "debug=cpu", "logger=console", "checkpoint.export_hf=false"]
TOO_BIG = [
    "model=llama3_1_8b",
    "method=full",
    "cluster.num_workers=1",
    "cluster.gpus_per_worker=1",
    "cluster.gpus_per_node=1",
    "plan.device=h100_80gb",
    "data.max_seq_len=2048",
]


def slurm_dry_run(tmp_path, monkeypatch, *overrides: str) -> int:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/sinfo: the script is only rendered
    return main([*TINY, f"run.output_dir={tmp_path}/run", "cluster=slurm", "cluster.dry_run=true", *overrides])


def test_slurm_refuses_a_run_that_does_not_fit(tmp_path, monkeypatch, capsys):
    rc = slurm_dry_run(tmp_path, monkeypatch, *TOO_BIG)
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not fit" in err and "DOES NOT FIT on h100_80gb" in err and "optimizer state" in err
    assert "plan.enforce=false" in err and "cluster.num_workers=" in err
    assert not (tmp_path / "run" / "launch" / "job.sbatch").exists()


def test_enforce_false_submits_anyway(tmp_path, monkeypatch, capsys):
    rc = slurm_dry_run(tmp_path, monkeypatch, *TOO_BIG, "plan.enforce=false")
    assert rc == 0
    assert (tmp_path / "run" / "launch" / "job.sbatch").is_file()
    assert "DOES NOT FIT" in capsys.readouterr().err


def test_auto_lowers_the_micro_batch_in_the_submitted_config(tmp_path, monkeypatch):
    fits_at_lower = [
        "model=qwen2_5_0_5b",
        "method=lora",
        "cluster.num_workers=1",
        "cluster.gpus_per_worker=1",
        "cluster.gpus_per_node=1",
        "plan.device=a100_40gb",
        "data.max_seq_len=4096",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
    ]
    assert slurm_dry_run(tmp_path, monkeypatch, *fits_at_lower) == 2
    assert slurm_dry_run(tmp_path, monkeypatch, *fits_at_lower, "plan.auto=true") == 0
    resolved = next((tmp_path / "run" / "launch").rglob("config.yaml"))
    mb = yaml.safe_load(resolved.read_text())["train"]["micro_batch_size"]
    assert 1 <= mb < 8


def test_a_gpu_run_that_cannot_fit_stops_before_any_worker(tmp_path, caplog):
    """`python -m orchestrator` plans a GPU run as the launchers do (on this CPU machine the
    driver is built directly: workers with GPUs could not start here)."""
    from orchestrator.driver import Driver

    over = ["+experiment=sft_tiny", "cluster.gpus_per_worker=1", "plan.device_memory_gb=0.01"]
    cfg = compose([*over, f"run.output_dir={tmp_path / 'a'}"])[0]
    with pytest.raises(ConfigError, match=r"does not fit its devices \(plan.enforce=false"):
        Driver(cfg)._prepare()
    assert not (tmp_path / "a" / "config.yaml").exists()  # stopped before the run was recorded
    cfg = compose([*over, "plan.enforce=false", f"run.output_dir={tmp_path / 'b'}"])[0]
    Driver(cfg)._prepare()
    assert (tmp_path / "b" / "config.yaml").is_file() and "does not fit" in caplog.text
