"""LoRA's weights for inference: the adapted layers merged under the base model's names
equal peft's own merge, so a plain model loading them computes the trained policy."""

from __future__ import annotations

import torch

from orchestrator.config.schema import LoraMethodConfig, ModelConfig
from orchestrator.methods.base import Reference
from orchestrator.methods.lora import Lora
from orchestrator.models import build_model

TINY = ModelConfig(name="t", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def test_merged_weights_equal_peft_merge_and_reference_is_the_base():
    method = Lora(LoraMethodConfig(r=4, alpha=16, dropout=0.0))
    model = method.build(TINY, torch.float32, seed=0)
    assert method.reference is Reference.WEIGHTS_OFF
    with torch.no_grad():  # trained-looking adapters: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(5, 250, (2, 12))
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with method.reference_context(model):
            reference = model(input_ids=ids).logits
    base = build_model(TINY, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reference, base(input_ids=ids).logits, rtol=0, atol=0)
    merged = method.hf_weights(model.state_dict())
    peft_merged = model.merge_and_unload().state_dict()
    assert merged and set(merged) <= set(peft_merged)
    assert {k for k in merged if k.endswith("proj.weight")} == {k for k in peft_merged if k.endswith("proj.weight")}
    for key, value in merged.items():
        torch.testing.assert_close(value, peft_merged[key], rtol=1e-6, atol=1e-6, msg=key)
    base.load_state_dict(merged, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, policy, rtol=1e-4, atol=1e-4)
