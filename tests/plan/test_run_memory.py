"""A run reports the plan's predicted peak per device after its first step (and on CUDA the
allocator's measured peak beside it): a real 2-worker CPU run on the session's Ray cluster."""

from __future__ import annotations

import pytest

from orchestrator.config.compose import compose
from orchestrator.plan import estimate
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

RUN = [
    "+experiment=sft_tiny",
    "train.max_steps=2",
    "checkpoint.every_steps=0",
    "checkpoint.save_final=false",
    "checkpoint.export_hf=false",
]


def test_first_step_logs_predicted_peak(run_main):
    rc, run_dir = run_main(*RUN)
    assert rc == 0
    cfg, _ = compose(["logger=console", "run.eval_after=false", f"run.output_dir={run_dir}", *RUN])
    want = sum(c.bytes for c in estimate(cfg).components if c.role == "policy" and c.where == "device")
    steps = read_metrics(run_dir)
    assert steps[0]["memory/predicted_peak_gib"] == pytest.approx(want / 2**30, abs=1e-4)
    assert want > 0
    # CPU has no allocator counter: no measured number is made up, and the line says so.
    assert "memory/measured_peak_gib" not in steps[0]
    assert all(not k.startswith("memory/") for k in steps[1])  # once, after the first step
    lines = [ln for ln in (run_dir / "train.log").read_text().splitlines() if "memory: predicted peak" in ln]
    assert len(lines) == 1 and "measured n/a on CPU" in lines[0], lines
