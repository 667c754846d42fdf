"""BitFit: only the bias terms train (every other weight stays bit-identical) and the loss
falls; the reference is a frozen copy; weight sync sends the biases; the export is a plain
model equal to the trained one; a model without biases is refused, naming one with them."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.config.schema import BitfitMethodConfig, ModelConfig
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.methods import METHODS
from orchestrator.methods.base import Reference
from orchestrator.methods.bitfit import Bitfit
from orchestrator.models import build_model
from tests.helpers import train_steps
from tests.methods.test_lora import export_like_the_engine

TINY_QWEN2 = ModelConfig(
    name="q", arch="qwen2", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
)
IDS = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def test_only_biases_train_and_the_export_is_the_trained_model(tmp_path):
    from transformers import AutoModelForCausalLM

    assert METHODS["bitfit"] is Bitfit
    method = Bitfit(BitfitMethodConfig())
    model = method.build(TINY_QWEN2, torch.float32, seed=0)
    assert method.reference is Reference.FROZEN_COPY
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, IDS, lr=5e-2)
    assert losses[-1] < losses[0] - 0.02, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    model.eval()
    with torch.no_grad():
        policy = model(input_ids=IDS).logits
    synced = method.hf_weights(model.state_dict())
    assert set(synced) == trainable
    plain = build_model(TINY_QWEN2, torch.float32).eval()
    plain.load_state_dict(synced, strict=False)
    out = export_like_the_engine(method, model, tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(out["model"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, policy, rtol=0, atol=0)
        torch.testing.assert_close(exported(input_ids=IDS).logits, policy, rtol=1e-6, atol=1e-6)


def test_a_model_without_biases_is_refused_naming_one_with_them():
    message = r"method=bitfit trains bias terms only, but model tiny_llama \(arch llama\) has no bias.*model=tiny_qwen2"
    with pytest.raises(ConfigError, match=message):
        validate(compose(["+experiment=sft_tiny", "method=bitfit"])[0])
    validate(compose(["+experiment=sft_tiny", "method=bitfit", "model=tiny_qwen2"])[0])
    llama = ModelConfig(name="tiny_llama", hidden_size=64, intermediate_size=128, num_layers=1)
    with pytest.raises(ConfigError, match=message):  # the same at build time (e.g. a checkpoint without biases)
        Bitfit(BitfitMethodConfig(), context=type("Spec", (), {"model": llama})()).build(llama, torch.float32, 0)
