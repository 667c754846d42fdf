"""DPO and KTO end to end on the session's Ray cluster (2 workers over gloo, tiny model,
generated preference pairs): the loss falls and the reward accuracy rises over a few steps
with LoRA (reference: adapters off) and full fine-tuning (a frozen reference role, or the
reference precomputed once), FSDP2 and ZeRO-3 follow the same curve from the same weights,
and a resumed run continues with identical numbers."""

from __future__ import annotations

import json
import shutil
from statistics import mean

import pytest
import torch

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

# 8 pairs, all in every step's batch: the preference is learned within a few steps even by
# a randomly initialised model (learning on unseen pairs is the README's CPU recipe).
BASE = [
    "+experiment=dpo_ultrafeedback",
    "debug=cpu",
    "run.init_from=null",
    "data.num_samples=8",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.warmup_steps=0",
    "eval.samples=0",
    "checkpoint.every_steps=0",
]
DPO = [*BASE, "stage.sft_weight=0"]  # plain DPO (the CPU recipe adds the NLL of the chosen answers)
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The tiny Llama written as a local 'pretrained' model: both backends start from it."""
    from orchestrator.config.compose import compose
    from orchestrator.models import build_model, build_tokenizer

    cfg, _ = compose(["model=tiny_llama"])
    path = tmp_path_factory.mktemp("tiny_pretrained")
    build_model(cfg.model, torch.float32).save_pretrained(path)
    build_tokenizer(cfg.model).save_pretrained(path)
    return path


def _assert_learns(steps: list[dict], accuracy: bool = True) -> None:
    losses = [m["loss"] for m in steps]
    assert mean(losses[-2:]) < mean(losses[:2]) - 0.02, losses
    margins = [m["rewards/margins"] for m in steps]
    assert margins[-1] > margins[0] and margins[-1] > 0, margins
    if accuracy:
        acc = [m["rewards/accuracies"] for m in steps]
        assert acc[-1] > acc[0] and acc[-1] >= 0.75, acc


def test_dpo_lora_learns_with_adapters_off_as_reference_and_reports_held_out(run_main):
    rc, run_dir = run_main(
        *DPO,
        "method=lora",
        "train.max_steps=6",
        "train.lr=2e-3",
        "eval.samples=8",
        "eval.every_steps=3",
        "rollout.max_new_tokens=3",
    )
    assert rc == 0
    steps = read_metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(1, 7))
    assert all(k in m for m in steps for k in KEYS)
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/margins"] == 0.0  # adapters start as a no-op
    _assert_learns(steps)
    assert "eval/rewards/accuracies" in steps[2] and "eval/exact_match" in steps[5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_before/rewards/margins"] == 0.0  # before training the policy is the reference
    assert {"eval_after/rewards/accuracies", "eval_after/loss", "eval_after/exact_match"} <= summary.keys()
    assert (run_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_full_frozen_reference_same_curve_on_fsdp2_and_zero3_and_resumes_identically(run_main, pretrained):
    common = [*DPO, "method=full", f"model.pretrained={pretrained}", "train.max_steps=6", "train.lr=1e-3"]
    curves = {}
    for backend in ("fsdp2", "deepspeed_zero3"):
        extra = ["checkpoint.every_steps=3"] if backend == "fsdp2" else []
        rc, run_dir = run_main(*common, f"backend={backend}", *extra, name=backend)
        assert rc == 0
        curves[backend] = read_metrics(run_dir)
        _assert_learns(curves[backend])
    for a, b in zip(curves["fsdp2"], curves["deepspeed_zero3"]):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)

    # Resume from the step-3 checkpoint: the frozen reference is rebuilt from the start weights.
    ref_dir = run_dir.parent / "fsdp2"
    resumed = ref_dir.parent / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_dir / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    rc, resumed = run_main(*common, "checkpoint.resume=must", name="resumed")
    assert rc == 0
    want = {m["step"]: m for m in curves["fsdp2"]}
    got = read_metrics(resumed)
    assert [m["step"] for m in got] == [4, 5, 6]
    for m in got:
        assert all(m[k] == want[m["step"]][k] for k in KEYS), m["step"]


def test_dpo_precomputed_reference_trains_without_a_reference_model_and_resumes_identically(run_main):
    common = [*DPO, "method=full", "stage.precompute_ref=true", "train.max_steps=4", "train.lr=1e-3"]
    rc, ref = run_main(*common, "checkpoint.every_steps=2", name="ref")
    assert rc == 0
    assert (ref / "reference_logps.pt").is_file()
    assert "reference:" not in (ref / "train.log").read_text()  # no reference worker group was built
    full = read_metrics(ref)
    _assert_learns(full, accuracy=False)
    resumed = ref.parent / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    shutil.copy(ref / "reference_logps.pt", resumed / "reference_logps.pt")
    rc, resumed = run_main(*common, "checkpoint.resume=must", name="resumed")
    assert rc == 0
    assert "reusing" in (resumed / "train.log").read_text()
    want = {m["step"]: m for m in full}
    assert [(m["step"], m["loss"], m["rewards/margins"]) for m in read_metrics(resumed)] == [
        (s, want[s]["loss"], want[s]["rewards/margins"]) for s in (3, 4)
    ]


def test_kto_lora_learns_on_pairs_split_into_desirable_and_undesirable(run_main):
    # 4 pairs -> 8 examples, all in every step's batch
    rc, run_dir = run_main(
        *BASE, "stage=kto", "method=lora", "data.num_samples=4", "train.max_steps=6", "train.lr=5e-3"
    )
    assert rc == 0
    steps = read_metrics(run_dir)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/rejected"):
        assert all(key in m for m in steps), key
    assert all(m["kl"] >= 0 for m in steps) and all(0 < m["desirable_fraction"] < 1 for m in steps)
    _assert_learns(steps, accuracy=False)
