"""LoRA variants end to end through the real entry on the session's Ray cluster (FSDP2, 2
ranks): DoRA, and PiSSA with rsLoRA, train; the export (gathered from the shards, written
through a meta skeleton) loads with peft and computes what the trained, sharded policy
computed; PiSSA's adapter is a plain rank-2r LoRA adapter on the original base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config.schema import ModelConfig
from orchestrator.models import build_model
from orchestrator.models.logprobs import token_logprobs
from tests.conftest import read_metrics
from tests.helpers import RecordLogprobs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "variant",
    [["method.use_dora=true"], ["method.init_lora_weights=pissa", "method.use_rslora=true"]],
    ids=["dora", "pissa-rslora"],
)
def test_variant_trains_sharded_and_exports_the_trained_policy(run_main, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    steps = 3
    rc, run_dir = run_main(
        "+experiment=sft_tiny_lora",
        *variant,
        "method.r=4",
        "method.dropout=0.0",
        "data.num_samples=200",
        f"train.max_steps={steps}",
        "checkpoint.every_steps=0",
        "run.callbacks=[tests.helpers:RecordLogprobs]",
        f"+extra.record_logprobs_at={steps}",
    )
    assert rc == 0
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == steps and losses[-1] < losses[0], losses
    exports = json.loads((run_dir / "summary.json").read_text())["exports"]
    base = AutoModelForCausalLM.from_pretrained(exports["base"])
    adapter = json.loads((Path(exports["adapter"]) / "adapter_config.json").read_text())
    if "method.use_dora=true" in variant:
        assert adapter["use_dora"] is True and adapter["r"] == 4
    else:  # converted: B A - B0 A0 as rank 2r on the original (seeded) base, not the residual
        assert adapter["r"] == 8 and adapter["init_lora_weights"] is True and adapter["use_rslora"] is True
        original = build_model(ModelConfig(name="tiny_llama"), torch.float32).state_dict()
        for key, value in base.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=1e-5, atol=1e-5, msg=key)
    model = PeftModel.from_pretrained(base, exports["adapter"]).eval()
    with torch.no_grad():
        exported = token_logprobs(model, RecordLogprobs.batch(), 256)[0]
    torch.testing.assert_close(exported, torch.load(run_dir / RecordLogprobs.FILE), rtol=1e-4, atol=1e-4)
