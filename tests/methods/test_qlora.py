"""QLoRA on a real bitsandbytes 4-bit base (bitsandbytes runs NF4/FP4 on CPU): the base is
4-bit, only the adapters train and the loss falls (with gradient checkpointing too); the
weights sent to a rollout engine make a plain float model compute the QLoRA policy; the
export loads with peft on the de-quantized base, also with DoRA and rsLoRA; bad combinations
(PiSSA / OLoRA on a 4-bit base among them) fail at validation."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.config.schema import Fsdp2BackendConfig, ModelConfig, QloraMethodConfig
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.methods.base import Reference
from orchestrator.methods.qlora import Qlora
from orchestrator.models import build_model
from tests.helpers import train_steps

bnb = pytest.importorskip("bitsandbytes")

TINY = ModelConfig(name="t", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
IDS = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def _qlora(checkpointing: bool = False, **kw) -> tuple[Qlora, torch.nn.Module]:
    context = SimpleNamespace(backend=Fsdp2BackendConfig(activation_checkpointing=checkpointing))
    method = Qlora(QloraMethodConfig(r=4, alpha=16, dropout=0.0, **kw), context)
    return method, method.build(TINY, torch.float32, seed=0)


def _randomize_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():  # trained-looking adapters: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_base_is_4bit_only_adapters_train_and_bytes_shrink(quant_type):
    method, model = _qlora(quant_type=quant_type)
    assert method.reference is Reference.WEIGHTS_OFF
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == TINY.num_layers * 7  # q k v o gate up down, each wrapped by a LoRA layer
    assert all(n.endswith(".base_layer") for n in layers)
    assert {m.weight.quant_state.quant_type for m in layers.values()} == {quant_type}
    assert all(m.weight.quant_state.nested for m in layers.values())  # double quantization
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # the output head stays float
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    stats = method.memory_stats(model)
    assert stats["base_4bit_rank_bytes"] == stats["base_4bit_bytes"]  # unsharded: all of it here
    # 4 bits per weight (1/8 of fp32) + an 8-bit absmax per 64 weights (double quant) + code
    # books of ~1 KiB per layer, which weigh in on a 64-wide model (0.13 on a real one).
    assert 0.125 < stats["base_4bit_bytes"] / stats["base_fp32_bytes"] < 0.2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_a_few_steps_lower_the_loss(checkpointing):
    _, model = _qlora(checkpointing)  # prepared for k-bit training with the backend's checkpointing
    assert model.get_base_model().is_gradient_checkpointing is checkpointing
    # Bytes, not values: packed 4-bit codes stored as float32 include NaN bit patterns.
    frozen = {n: p.detach().view(torch.uint8).clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, IDS, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p.view(torch.uint8), frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_hf_weights_make_a_float_model_compute_the_policy():
    method, model = _qlora()
    _randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=IDS).logits
        with method.reference_context(model):
            reference = model(input_ids=IDS).logits
    weights = method.hf_weights(model.state_dict())
    linears = {f"{n}.weight" for n, m in build_model(TINY, torch.float32).named_modules() if "layers." in n}
    linears = {k for k in linears if k.endswith("proj.weight")}
    assert set(weights) == linears  # every 4-bit layer, merged, under the HF names
    assert all(v.dtype == torch.float32 and v.dim() == 2 for v in weights.values())
    plain = build_model(TINY, torch.float32).eval()
    with torch.no_grad():
        original = plain(input_ids=IDS).logits
        plain.load_state_dict(weights, strict=False)
        synced = plain(input_ids=IDS).logits
    torch.testing.assert_close(synced, policy, rtol=1e-4, atol=1e-4)
    # The reference is the 4-bit base: close to the float base it was quantized from (NF4
    # error), and not the adapted policy.
    assert (reference - original).abs().max() < 0.1 < (policy - reference).abs().max()


def test_export_loads_with_peft_on_the_dequantized_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestrator.models.tokenizer import byte_tokenizer

    method, model = _qlora(export_merged=True)
    _randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=IDS).logits
    # What EngineBase.export_hf does with the gathered state: a float skeleton with adapters.
    floats = method.float_state(model.state_dict())
    assert not any(k.endswith((".absmax", ".quant_map")) or "quant_state" in k for k in floats)
    skeleton = method.apply(AutoModelForCausalLM.from_config(model.get_base_model().config))
    skeleton.load_state_dict(floats, strict=True)
    out = method.export(skeleton, tmp_path, byte_tokenizer(), base_ref=None)
    base = AutoModelForCausalLM.from_pretrained(out["base"])
    assert not hasattr(base.config, "quantization_config")  # a plain float model
    peft_model = PeftModel.from_pretrained(base, out["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(out["merged"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, policy, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=IDS).logits, policy, rtol=1e-4, atol=1e-4)


def test_dora_and_rslora_on_the_4bit_base_train_sync_and_export_the_policy(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.methods.test_lora import export_like_the_engine

    method, model = _qlora(use_dora=True, use_rslora=True)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and "default" in layer.lora_magnitude_vector
    assert layer.scaling["default"] == pytest.approx(16 / 2) == method.scale  # alpha / sqrt(r)
    losses = train_steps(model, IDS, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=IDS).logits
    plain = build_model(TINY, torch.float32).eval()
    plain.load_state_dict(method.hf_weights(model.state_dict()), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, policy, rtol=1e-4, atol=1e-4)
    out = export_like_the_engine(method, model, tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out["base"]), out["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, policy, rtol=1e-4, atol=1e-4)


def test_bad_combinations_fail_at_validation_naming_the_fix(monkeypatch):
    base = ["+experiment=sft_tiny_lora", "method=qlora"]
    with pytest.raises(ConfigError, match=r"backend=deepspeed_zero3.*Use backend=fsdp2"):
        validate(compose([*base, "backend=deepspeed_zero3"])[0])
    with pytest.raises(ConfigError, match=r"MoE.*method=lora"):
        validate(compose([*base, "model=tiny_moe"])[0])
    for init in ("pissa", "olora"):
        with pytest.raises(ConfigError, match=rf"init_lora_weights={init} with method=qlora.*Use method=lora"):
            validate(compose([*base, f"method.init_lora_weights={init}"])[0])
    with pytest.raises(ConfigError, match=r"method.quant_type='nf5'.*nf4, fp4"):
        compose([*base, "method.quant_type=nf5"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when missing
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    with pytest.raises(ConfigError, match=r'bitsandbytes.*pip install -e "\.\[qlora\]"'):
        validate(compose(base)[0])
