"""Resolving the models of an eval: a LoRA run's adapter-only export is merged onto its base
into the eval's own directory, and the merged model computes what the adapter does."""

from __future__ import annotations

import torch

from orchestrator.config.compose import compose
from orchestrator.evals.models import resolve
from orchestrator.models import build_model, build_tokenizer


def test_an_adapter_is_merged_once_into_the_eval_dir(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg, _ = compose(["+experiment=sft_tiny"])
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = build_model(cfg.model, torch.float32)
    base.save_pretrained(base_dir)
    build_tokenizer(cfg.model).save_pretrained(base_dir)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft.save_pretrained(adapter_dir)
    build_tokenizer(cfg.model).save_pretrained(adapter_dir)

    work = tmp_path / "eval"
    m = resolve(str(adapter_dir), "candidate", "eval.candidate", cfg.model, work)
    assert m.spec.pretrained == str(work / "merged_candidate") and m.run_dir is None
    ids = torch.tensor([[1, 70, 80, 90, 100]])
    merged = AutoModelForCausalLM.from_pretrained(m.spec.pretrained)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)
    stamp = (work / "merged_candidate" / "config.json").stat().st_mtime_ns
    resolve(str(adapter_dir), "candidate", "eval.candidate", cfg.model, work)  # merged already: reused
    assert (work / "merged_candidate" / "config.json").stat().st_mtime_ns == stamp
    assert list(adapter_dir.iterdir()) and not (adapter_dir / "config.json").exists()  # the adapter dir untouched
