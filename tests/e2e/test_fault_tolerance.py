"""Injected faults: a worker process killed mid-run is detected, the group is rebuilt from
the last complete checkpoint and the run finishes with the losses of an uninterrupted run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

COMMON = ["+experiment=sft_tiny", "train.max_steps=8", "checkpoint.every_steps=2", "data.num_samples=300",
          "checkpoint.export_hf=false"]


def _last_per_step(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}  # re-run steps: the last wins


def test_killed_worker_recovers_in_job_with_identical_losses(run_main):
    rc, ref = run_main(*COMMON, name="ref")
    assert rc == 0
    rc, run = run_main(*COMMON, "run.callbacks=[tests.helpers:KillWorkerAtStep]", "+extra.kill_worker_at_step=5",
                       name="killed")
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == 1
    log = (run / "train.log").read_text()
    assert "worker failure at step 6" in log and "rank 1" in log and "step_00000004" in log
    # Steps 5..6 ran twice (5 before the kill, 6 failed); every logged loss equals the reference.
    assert _last_per_step(run) == _last_per_step(ref)


def test_without_restarts_left_the_run_stops_naming_the_rank(run_main, capsys):
    rc, run = run_main(*COMMON, "run.max_restarts=0", "run.callbacks=[tests.helpers:KillWorkerAtStep]",
                       "+extra.kill_worker_at_step=3", name="fatal")
    assert rc == 1
    err = capsys.readouterr().err
    assert "rank 1" in err and "No restarts left" in err
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()  # nothing lost
