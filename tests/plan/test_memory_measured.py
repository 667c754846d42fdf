"""The plan's model state and activations against one real CPU training step of a
~23M-parameter Llama and a ~24M-parameter MoE (benchmarks/memory_plan.py; its full table is
docs/memory_plan.md)."""

from __future__ import annotations

import pytest

from benchmarks.memory_plan import measure, measure_engine

TOLERANCE = 0.15


@pytest.mark.parametrize("method", ["full", "lora"])
def test_model_state_within_tolerance(method):
    r = measure(method, checkpointing=False, seq=32, micro_batch=1, peak=False)
    assert r["params"] > 20_000_000
    assert abs(r["state_pred"] - r["state_meas"]) <= TOLERANCE * r["state_meas"], r


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_within_tolerance(method, checkpointing):
    """What forward keeps for backward: per layer, plus the final norm and LM head's inputs
    after the last (which is most of it under checkpointing)."""
    r = measure(method, checkpointing=checkpointing, seq=64, micro_batch=2, peak=False)
    assert abs(r["act_pred"] - r["act_meas"]) <= TOLERANCE * r["act_meas"], r


@pytest.mark.parametrize("checkpointing", [False, True])
def test_experts_moe_within_tolerance(checkpointing):
    """The experts method on a ~24M-parameter Qwen3-MoE: the trainable expert slices beside
    the frozen fused tensors, and the merged expert tensors each layer keeps for backward."""
    r = measure("experts", checkpointing=checkpointing, seq=64, micro_batch=2, peak=False, model="moe")
    assert r["params"] > 20_000_000 and 0 < r["trainable"] < r["params"]
    assert abs(r["state_pred"] - r["state_meas"]) <= TOLERANCE * r["state_meas"], r
    assert abs(r["act_pred"] - r["act_meas"]) <= TOLERANCE * r["act_meas"], r


def test_fsdp2_two_ranks_within_tolerance():
    """The FSDP2 engine on two gloo processes: each rank's shard of parameters, gradients and
    AdamW state, and the activations of its own micro-batch."""
    r = measure_engine("fsdp2", "full", 2, checkpointing=False, seq=64, micro_batch=2)
    assert abs(r["state_pred"] - r["state_meas"]) <= TOLERANCE * r["state_meas"], r
    assert abs(r["act_pred"] - r["act_meas"]) <= TOLERANCE * r["act_meas"], r


def test_peak_with_checkpointing_within_tolerance():
    """Parameters + AdamW state + kept activations + one recomputed layer, steady state."""
    r = measure("full", checkpointing=True, seq=64, micro_batch=2)
    assert abs(r["peak_pred"] - r["peak_meas"]) <= TOLERANCE * r["peak_meas"], r
