"""LoRA's weights for inference: the adapted layers merged under the base model's names
equal peft's own merge, so a plain model loading them computes the trained policy. The
PEFT variants (DoRA, rsLoRA, Gaussian / PiSSA / OLoRA inits) train the adapters only, merge
as peft does and export what was trained; PiSSA / OLoRA reference a frozen copy and export a
plain LoRA adapter on the original base."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from orchestrator.config.schema import LoraMethodConfig, ModelConfig
from orchestrator.methods.base import Reference
from orchestrator.methods.lora import Lora
from orchestrator.models import build_model
from tests.helpers import train_steps

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


# ------------------------------------------------------------------ PEFT variants
IDS = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def export_like_the_engine(method, model: torch.nn.Module, out_dir) -> dict[str, str]:
    """What EngineBase.export_hf does with the gathered state: a meta skeleton with the
    method applied, the state assigned, then the method's export."""
    from transformers import AutoModelForCausalLM

    from orchestrator.methods.base import unwrap
    from orchestrator.models.tokenizer import byte_tokenizer

    state = method.float_state(model.state_dict())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(unwrap(model).config)
    skeleton = method.apply(skeleton)
    skeleton.load_state_dict(state, strict=True, assign=True)
    unwrap(skeleton).tie_weights()
    return method.export(skeleton, out_dir, byte_tokenizer(), base_ref=None)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize(
    "dora, rslora, init",
    [(True, False, "default"), (False, True, "gaussian"), (True, True, "default")],
    ids=["dora", "rslora-gaussian", "dora-rslora"],
)
def test_dora_rslora_train_adapters_only_merge_as_peft_and_export_the_trained_model(tmp_path, dora, rslora, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = LoraMethodConfig(r=4, alpha=16, dropout=0.0, use_dora=dora, use_rslora=rslora, init_lora_weights=init)
    method = Lora(cfg)
    model = method.build(TINY, torch.float32, seed=0)
    assert method.reference is Reference.WEIGHTS_OFF
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 2 if rslora else 16 / 4) == method.scale
    assert ("default" in layer.lora_magnitude_vector) is dora
    assert model.peft_config["default"].init_lora_weights == (True if init == "default" else init)
    base = build_model(TINY, torch.float32)
    torch.testing.assert_close(_logits(model), _logits(base), rtol=0, atol=1e-5)  # B starts at zero

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, IDS, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(".lora_A." in n or ".lora_B." in n or ".lora_magnitude_vector." in n for n in trainable)
    assert any(".lora_magnitude_vector." in n for n in changed) is dora

    policy = _logits(model)
    with torch.no_grad(), method.reference_context(model):
        torch.testing.assert_close(model(input_ids=IDS).logits, _logits(base), rtol=0, atol=1e-5)
    merged = method.hf_weights(model.state_dict())
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, peft_merged[key], rtol=1e-5, atol=1e-5, msg=key)
    synced = build_model(TINY, torch.float32)
    synced.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_logits(synced), policy, rtol=1e-4, atol=1e-4)

    out = export_like_the_engine(method, model, tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out["base"]), out["adapter"])
    torch.testing.assert_close(_logits(loaded), policy, rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is dora and config["use_rslora"] is rslora


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_start_at_the_base_reference_a_frozen_copy_export_a_lora_on_the_original_base(tmp_path, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method = Lora(LoraMethodConfig(r=4, alpha=8, dropout=0.0, use_rslora=init == "olora", init_lora_weights=init))
    model = method.build(TINY, torch.float32, seed=0)
    base = build_model(TINY, torch.float32)
    # The adapters hold the principal part of each weight, the base the residual: together
    # they start as the base, but adapters off is the residual, so the reference is a copy.
    torch.testing.assert_close(_logits(model), _logits(base), rtol=1e-4, atol=1e-4)
    assert method.reference is Reference.FROZEN_COPY
    with pytest.raises(NotImplementedError, match="frozen `reference` role"):
        method.reference_context(model)
    assert set(method.initial_adapters) == {k for k in model.state_dict() if ".lora_" in k}
    assert all(v.abs().sum() > 0 for v in method.initial_adapters.values())  # B is not zero

    losses = train_steps(model, IDS, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    policy = _logits(model)
    synced = build_model(TINY, torch.float32)
    synced.load_state_dict(method.hf_weights(model.state_dict()), strict=False)
    torch.testing.assert_close(_logits(synced), policy, rtol=1e-4, atol=1e-4)

    out = export_like_the_engine(method, model, tmp_path)
    original = AutoModelForCausalLM.from_pretrained(out["base"])
    for key, value in base.state_dict().items():  # the original base, not the residual
        torch.testing.assert_close(original.state_dict()[key], value, rtol=1e-5, atol=1e-5, msg=key)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # a plain rank-2r LoRA adapter
    loaded = PeftModel.from_pretrained(original, out["adapter"])
    torch.testing.assert_close(_logits(loaded), policy, rtol=1e-4, atol=1e-4)


def test_variant_combinations_that_cannot_work_fail_at_validation():
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate
    from orchestrator.errors import ConfigError

    base = ["+experiment=sft_tiny_lora"]
    with pytest.raises(ConfigError, match=r"init_lora_weights=pissa with method.use_dora=true.*use_dora=false"):
        validate(compose([*base, "method.init_lora_weights=pissa", "method.use_dora=true"])[0])
    if importlib.util.find_spec("deepspeed") is not None:
        with pytest.raises(ConfigError, match=r"use_dora=true with backend=deepspeed_zero3.*Use backend=fsdp2"):
            validate(compose([*base, "method.use_dora=true", "backend=deepspeed_zero3"])[0])
        with pytest.raises(ConfigError, match=r"init_lora_weights=olora with backend=deepspeed_zero3"):
            validate(compose([*base, "method.init_lora_weights=olora", "backend=deepspeed_zero3"])[0])
    with pytest.raises(ConfigError, match=r"method.init_lora_weights='svd' is not valid.*default, gaussian"):
        compose([*base, "method.init_lora_weights=svd"])


@pytest.mark.parametrize("head", ["score", "value"])
def test_scalar_heads_train_in_full_beside_the_adapters(head):
    """A reward model's score head and a critic's value head (PPO) take adapters on every
    linear layer but the head, which trains in full; the base stays frozen."""
    model = build_model(ModelConfig(name="tiny_llama"), torch.float32, head=head)
    peft_model = Lora(LoraMethodConfig(r=4, alpha=8)).apply(model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if ".score." in n}
    assert heads and all("modules_to_save" in n for n in heads)  # the whole head, not an adapter on it
    assert all("lora_" in n for n in trainable - heads) and len(trainable - heads) > 10
    ids = torch.randint(5, 250, (2, 12))
    out = peft_model(input_ids=ids).logits
    assert out.shape == ((2, 1) if head == "score" else (2, 12, 1))
