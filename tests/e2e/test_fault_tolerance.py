"""Injected faults: a worker process (a train worker, or an RL stage's rollout worker) killed
mid-run is detected, the groups are rebuilt from the last complete checkpoint and the run
finishes with the losses of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics
from tests.helpers import KillRolloutWorkerAtStep

pytestmark = pytest.mark.slow

COMMON = [
    "+experiment=sft_tiny",
    "train.max_steps=8",
    "checkpoint.every_steps=2",
    "data.num_samples=300",
    "checkpoint.export_hf=false",
]


def _last_per_step(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}  # re-run steps: the last wins


def test_killed_worker_recovers_in_job_with_identical_losses(run_main):
    rc, ref = run_main(*COMMON, name="ref")
    assert rc == 0
    rc, run = run_main(
        *COMMON, "run.callbacks=[tests.helpers:KillWorkerAtStep]", "+extra.kill_worker_at_step=5", name="killed"
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == 1
    log = (run / "train.log").read_text()
    assert "worker failure at step 6" in log and "rank 1" in log and "step_00000004" in log
    # Steps 5..6 ran twice (5 before the kill, 6 failed); every logged loss equals the reference.
    assert _last_per_step(run) == _last_per_step(ref)


def test_killed_rollout_worker_recovers_in_job_and_repeats_the_step(run_main):
    """GRPO's rollout actor killed after step 3: step 4's generation fails, the run takes the
    worker-failure path (every group and the rollout group rebuilt, weights restored from the
    step-2 checkpoint and synced to the new engine) and step 3 reruns with the same samples,
    rewards and loss. The recovery does not depend on the engine (rollout=hf here, cheap)."""
    rc, run = run_main(
        "+experiment=grpo_math",
        "debug=cpu",
        "run.init_from=null",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "checkpoint.export_hf=false",
        "stage.prompts_per_step=4",
        "rollout.n=4",
        "eval.samples=0",
        "stage.rewards=[{name:format,kwargs:{pattern:'[0-9]'}}]",
        "train.lr=1e-2",
        "run.callbacks=[tests.helpers:KillRolloutWorkerAtStep]",
        "+extra.kill_rollout_at_step=3",
        name="rollout_killed",
    )
    assert rc == 0
    assert json.loads((run / "summary.json").read_text())["restarts"] == 1
    log = (run / "train.log").read_text()
    assert "worker failure at step 4: rollout generation failed" in log and "step_00000002" in log
    steps = {m["step"]: m for m in read_metrics(run)}
    assert sorted(steps) == [1, 2, 3, 4]
    before = json.loads((run / KillRolloutWorkerAtStep.FILE).read_text())
    for key in ("loss", "grad_norm", "reward_mean", "completion_len", "rollout_version", "policy_version"):
        assert steps[3][key] == before[key], key
    assert steps[4]["rollout_version"] == 3


def test_without_restarts_left_the_run_stops_naming_the_rank(run_main, capsys):
    rc, run = run_main(
        *COMMON,
        "run.max_restarts=0",
        "run.callbacks=[tests.helpers:KillWorkerAtStep]",
        "+extra.kill_worker_at_step=3",
        name="fatal",
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "rank 1" in err and "No restarts left" in err
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()  # nothing lost


def _dcp_state(ckpt, out):
    """Model + optimizer tensors of a sharded checkpoint, flattened."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, out)
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif torch.is_tensor(obj):
            flat[prefix] = obj

    walk("", torch.load(out, weights_only=False))
    return flat


def test_nan_on_one_rank_skips_the_update_on_every_rank(run_main, monkeypatch, tmp_path):
    """A NaN loss planted on rank 1 at step 3: no rank applies that update (the sharded
    model and optimizer state saved after step 3 are byte-identical to those after step 2),
    the skip is reported naming step and rank, and training goes on."""
    monkeypatch.setenv("ORCHESTRATOR_FAULT_NAN", "1:3")
    rc, run = run_main(*COMMON, "train.max_steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=5", name="nan")
    assert rc == 0
    steps = {m["step"]: m for m in read_metrics(run)}
    assert steps[3]["skipped"] == 1 and all(steps[s]["skipped"] == 0 for s in (1, 2, 4, 5))
    assert all(steps[s]["loss"] == steps[s]["loss"] for s in (4, 5))  # finite again afterwards
    assert "step 3: non-finite loss or gradient norm from rank(s) [1]" in (run / "train.log").read_text()
    states = {s: _dcp_state(run / "checkpoints" / f"step_{s:08d}", tmp_path / f"s{s}.pt") for s in (2, 3, 4)}
    assert states[2].keys() == states[3].keys() and len(states[2]) > 10
    assert all(torch.equal(states[2][k], states[3][k]) for k in states[2])  # step 3 applied nothing
    assert not all(torch.equal(states[3][k], states[4][k]) for k in states[3])  # step 4 did

    monkeypatch.setenv("ORCHESTRATOR_FAULT_NAN", "0:2")
    rc, run = run_main(
        *COMMON, "train.max_steps=3", "checkpoint.every_steps=0", "train.on_nonfinite=stop", name="nan_stop"
    )
    assert rc == 1
    assert "step 2: non-finite loss or gradient norm from rank(s) [0]" in (run / "train.log").read_text()
