"""Golden runs: the per-step numbers of four recipes, recorded once and compared exactly.

Numbers that move silently are the worst bug in this field. Each case below runs the real
entry for a short window (tens of steps) and compares every step's loss and gradient norm
(and GRPO's reward and held-out accuracy) with `tests/golden/<case>.json`, bit for bit.
They hold on the pinned versions of `constraints.txt` on CPU. A deliberate change of the
numbers (a version bump, a fixed bug) re-records them, and the commit says why:

    ORCHESTRATOR_RECORD_GOLDEN=1 pytest tests/golden
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
RECORD = os.environ.get("ORCHESTRATOR_RECORD_GOLDEN") == "1"
NO_FILES = ["checkpoint.every_steps=0", "checkpoint.save_final=false", "checkpoint.export_hf=false"]
KEYS = ("loss", "grad_norm", "lr", "reward_mean", "accuracy", "samples_trained")

CASES: dict[str, list[str]] = {
    "sft_tiny": ["+experiment=sft_tiny", "train.max_steps=20", *NO_FILES],
    "sft_tiny_lora": ["+experiment=sft_tiny_lora", "train.max_steps=20", *NO_FILES],
    "moe_experts": ["+experiment=moe_experts", "debug=cpu", "train.max_steps=10", *NO_FILES],
}
# GRPO starts from a short SFT warm-up (recorded too), so rewards carry signal.
WARMUP = ["+experiment=sft_arith_warmup", "train.max_steps=60", "checkpoint.every_steps=0"]
GRPO = [
    "+experiment=grpo_math",
    "debug=cpu",
    "train.max_steps=5",
    "eval.samples=24",
    "stage.prompts_per_step=16",
    "checkpoint.every_steps=0",
    "checkpoint.save_final=false",
    "checkpoint.export_hf=false",
]


def _numbers(run_dir: Path) -> dict[str, Any]:
    steps = [{k: m[k] for k in KEYS if k in m} for m in read_metrics(run_dir)]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"steps": steps, "summary": {k: v for k, v in summary.items() if k.startswith("eval_")}}


def _check(name: str, got: dict[str, Any]) -> None:
    path = HERE / f"{name}.json"
    if RECORD:
        path.write_text(json.dumps(got, indent=1) + "\n")
        return
    want = json.loads(path.read_text())
    assert len(got["steps"]) == len(want["steps"]), name
    for i, (g, w) in enumerate(zip(got["steps"], want["steps"]), start=1):
        assert g == w, f"{name}: step {i} moved: got {g}, golden {w}"
    assert got["summary"] == want["summary"], name


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_losses_are_unchanged(run_main, name):
    rc, run_dir = run_main(*CASES[name], name=name)
    assert rc == 0
    _check(name, _numbers(run_dir))


def test_golden_grpo_after_sft_warmup_is_unchanged(run_main):
    rc, warm = run_main(*WARMUP, name="warmup")
    assert rc == 0
    _check("grpo_warmup", _numbers(warm))
    rc, run_dir = run_main(*GRPO, f"run.init_from={warm}", name="grpo")
    assert rc == 0
    _check("grpo_math", _numbers(run_dir))
