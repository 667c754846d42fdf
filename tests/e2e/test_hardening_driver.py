"""Driver-side faults, injected for real: Ctrl-C (a real SIGINT to the entry process), a rerun
with an incompatible config into a used run directory, and two runs racing for one run dir."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, read_metrics

pytestmark = pytest.mark.slow

ENTRY = [sys.executable, "-m", "orchestrator", "+experiment=sft_tiny", "logger=console", "cluster.num_cpus=2"]


def _wait_for_step(run_dir, step: int, proc, timeout: float = 180) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_ctrl_c_checkpoints_after_the_step_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *ENTRY,
            f"run.output_dir={run_dir}",
            "train.max_steps=400",
            "checkpoint.every_steps=0",
            "checkpoint.export_hf=false",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = read_metrics(run_dir)[-1]["step"]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step_{stopped:08d}"]  # nothing lost: the step it stopped after is saved
    assert err.count("stopped by SIGINT") == 1  # one line, not twice


def test_rerun_with_another_model_refuses_before_writing_and_harmless_changes_are_recorded(run_main):
    base = ["+experiment=sft_tiny", "train.max_steps=2", "checkpoint.every_steps=2", "checkpoint.export_hf=false"]
    rc, run_dir = run_main(*base, name="run")
    assert rc == 0
    original = (run_dir / "config.yaml").read_text()
    rc, _ = run_main(*base, "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=1", name="run")
    assert rc == 2  # a config error, before any worker starts
    assert (run_dir / "config.yaml").read_text() == original
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
    # A longer run and another log interval are fine: resumed, recorded, the original kept.
    rc, _ = run_main(
        *base[:1],
        "train.max_steps=3",
        "checkpoint.every_steps=2",
        "checkpoint.export_hf=false",
        "logger.log_every=2",
        name="run",
    )
    assert rc == 0
    assert (run_dir / "config.yaml").read_text() == original
    history = yaml.safe_load((run_dir / "config_history" / "001.yaml").read_text())
    assert history["changed"]["train.max_steps"] == {"was": 2, "now": 3}
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 2


def test_two_runs_into_one_run_dir_the_second_refuses_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *ENTRY,
        f"run.output_dir={run_dir}",
        "train.max_steps=400",
        "checkpoint.every_steps=0",
        "checkpoint.export_hf=false",
    ]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run_dir, 1, first)
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert "ray: started" not in second.stderr  # refused before it started a Ray cluster
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
