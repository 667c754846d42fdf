"""Kill the driver (SIGKILL) mid-run, rerun the same command: it resumes from the last
complete checkpoint and the following steps have bit-identical losses on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from orchestrator.__main__ import main
from tests.conftest import REPO, read_metrics

pytestmark = pytest.mark.slow


# DeepSpeed with LoRA + dropout: adapters, Adam state, schedule and worker RNG must all resume
# exactly; its full-parameter restore is covered (on other world sizes) by tests/engines.
# FSDP2 + LoRA saves in the background (checkpoint.async_save): the save begun at step 4 is
# still uncommitted when the driver dies at step 5, so the rerun resumes from step 2.
# QLoRA: checkpoints hold the adapters only; the resumed run re-quantizes the same 4-bit base.
@pytest.mark.parametrize(
    "backend, method, async_save",
    [
        ("fsdp2", "full", False),
        ("fsdp2", "lora", True),
        ("deepspeed_zero3", "lora", False),
        pytest.param(
            "fsdp2",
            "qlora",
            False,
            marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
        ),
    ],
)
def test_killed_run_resumes_with_identical_losses(ray_cluster, tmp_path, backend, method, async_save):
    steps = 6 if method == "qlora" else 8  # QLoRA: 2 steps after the resume, no export (the slowest method on CPU)
    common = [
        "+experiment=sft_tiny",
        f"backend={backend}",
        f"method={method}",
        f"train.max_steps={steps}",
        "checkpoint.every_steps=2",
        "logger=console",
        "data.num_samples=300",
        f"checkpoint.async_save={async_save}",
    ]
    if method in ("lora", "qlora"):
        common += ["method.dropout=0.1"]  # dropout: the workers' RNG must resume too
    if method == "qlora":
        common += ["checkpoint.export_hf=false"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert main(common + [f"run.output_dir={ref_dir}"]) == 0
    reference = {m["step"]: m["loss"] for m in read_metrics(ref_dir)}

    # A real crash: the driver SIGKILLs itself at the end of step 5 (after checkpoint 4).
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        *common,
        f"run.output_dir={run_dir}",
        "cluster=ray",
        f"cluster.address={ray_cluster.address}",
        "run.callbacks=[tests.helpers:KillAtStep]",
        "+extra.kill_at_step=5",
    ]
    crashed = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    committed = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert committed == (["step_00000002"] if async_save else ["step_00000002", "step_00000004"])
    if async_save:
        assert (run_dir / "checkpoints" / ".step_00000004.tmp").is_dir()
        assert "writing in the background" in crashed.stdout + crashed.stderr

    # The same command again (without the fault): resumes from the last committed step.
    assert main(common + [f"run.output_dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    start = 2 if async_save else 4
    assert summary["resumed_from"] == start
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # each step once, the crash's extra dropped
    resumed = metrics[start:]
    assert [m["step"] for m in resumed] == list(range(start + 1, steps + 1))
    assert [m["loss"] for m in resumed] == [reference[s] for s in range(start + 1, steps + 1)]
    if async_save:  # the reference run committed its background saves too
        assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


def test_resume_must_without_checkpoint_fails_and_never_refuses_to_overwrite(run_main, tmp_path):
    rc, run_dir = run_main("+experiment=sft_tiny", "checkpoint.resume=must", name="empty")
    assert rc == 1 and not (run_dir / "metrics.jsonl").exists()
    rc, run_dir = run_main("+experiment=sft_tiny", "train.max_steps=2", "checkpoint.export_hf=false", name="r")
    assert rc == 0
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    rc, _ = run_main("+experiment=sft_tiny", "train.max_steps=2", "checkpoint.resume=never", name="r")
    assert rc == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
