"""Bad launcher input fails before anything is rendered or submitted, with one message that
names the key. (Checks that need a live cluster, e.g. a partition without GPUs or an
unreachable Ray address, are in the test modules of those launchers.)"""

from __future__ import annotations

import pytest

from orchestrator.config.validate import slurm_time_seconds
from orchestrator.errors import ConfigError
from tests.launchers.conftest import entry

BAD = [
    (["cluster=slurm", "cluster.time=1:2:3:4"], "cluster.time='1:2:3:4' is not a Slurm time limit"),
    (["cluster=slurm", "cluster.mem=lots"], "cluster.mem='lots' is not a Slurm memory size"),
    (
        ["cluster=slurm", "cluster.time=5", "cluster.signal_before_s=300"],
        "cluster.signal_before_s=300 is not shorter than cluster.time='5' (300s)",
    ),
    (
        ["cluster=slurm", "cluster.num_workers=4", "cluster.gpus_per_worker=1", "cluster.gpus_per_node=2"],
        "= 4 GPU(s) but the job asks for cluster.nodes=1 x cluster.gpus_per_node=2 = 2",
    ),
    (
        ["cluster=slurm", "cluster.gpus_per_worker=1"],
        "= 1 GPU(s) but the job asks for cluster.nodes=1 x cluster.gpus_per_node=0 = 0",
    ),
    (["cluster=slurm", "cluster.nodes=0"], "cluster.nodes=0 must be > 0"),
    (
        ["cluster=slurm", "cluster.cpus_per_node=1", "cluster.num_workers=2"],
        "CPUs do not fit in cluster.nodes=1 x cluster.cpus_per_node=1",
    ),
    (["cluster=slurm", "cluster.sbatch_args=[constraint]"], "entry 'constraint' must be an sbatch option"),
    (["cluster=slurm", "cluster.ray_port=80"], "cluster.ray_port=80 must be in [1024, 65535]"),
    (["cluster=slurm", "+cluster.env.BAD-NAME=x"], "cluster.env key 'BAD-NAME' is not a valid environment"),
    (["cluster=ray_job", "cluster.address=not a url"], "is not a Ray Jobs API address"),
    (
        ["cluster=kubernetes", "cluster.memory_per_node=32 GB"],
        "cluster.memory_per_node='32 GB' is not a Kubernetes quantity",
    ),
    (["cluster=kubernetes", "cluster.namespace=ML_Team"], "cluster.namespace='ML_Team' is not a valid"),
    (["cluster=kubernetes", "cluster.image_pull_policy=Sometimes"], "Valid values: Always, IfNotPresent, Never"),
    (
        ["cluster=kubernetes", "cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.num_workers=3"],
        "= 3 GPU(s) but the job asks for cluster.nodes=2 x cluster.gpus_per_node=1 = 2",
    ),
    (["cluster=kubernetes", "cluster.shared_mount=mnt"], "cluster.shared_mount='mnt' must be an absolute path"),
    (["cluster=kubernetes", "cluster.time=2h"], "cluster.time='2h' is not a Slurm time limit"),
    (["cluster=kubernetes", "cluster.shm_size=lots"], "cluster.shm_size='lots' is not a Kubernetes quantity"),
    (["cluster=kubernetes", "cluster.image_pull_secrets=[Reg_Cred]"], "cluster.image_pull_secrets: 'Reg_Cred' is not"),
    (["cluster=kubernetes", "cluster.kueue_queue=Team A"], "cluster.kueue_queue: 'Team A' is not a Kubernetes object"),
    (["cluster=kubernetes", "cluster.stop_grace_s=0"], "cluster.stop_grace_s=0 must be > 0"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o[1:]) for o, _ in BAD])
def test_bad_input_is_a_config_error(overrides, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "cluster=slurm" in overrides:  # should validation miss, render instead of submitting
        overrides = [*overrides, "cluster.dry_run=true"]
    rc = entry("+experiment=sft_tiny", "logger=console", "run.output_dir=runs/x", *overrides)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert not (tmp_path / "runs" / "x" / "launch").exists()


def test_missing_sbatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = entry("+experiment=sft_tiny", "logger=console", f"run.output_dir={tmp_path}/run", "cluster=slurm")
    assert rc == 2
    assert "`sbatch` is not on PATH; it is needed to submit to Slurm" in capsys.readouterr().err
    assert not (tmp_path / "run" / "launch").exists()


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("90", 5400),
        ("10:30", 630),
        ("24:00:00", 86400),
        ("2-00", 172800),
        ("1-02:03", 93780),
        ("1-02:03:04", 93784),
        ("UNLIMITED", None),
    ],
)
def test_slurm_time_formats(value, seconds):
    assert slurm_time_seconds(value) == seconds


def test_slurm_time_rejects_garbage():
    with pytest.raises(ConfigError):
        slurm_time_seconds("1h")
