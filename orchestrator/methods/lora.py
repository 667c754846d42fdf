"""LoRA via `peft` (Hu et al., arXiv:2106.09685): frozen base, trainable low-rank adapters.

Export writes a PEFT adapter loadable with `PeftModel.from_pretrained`. When the base is
not a hub id or directory (a locally built model), the base is exported beside the
adapter and the adapter points at it, so the pair always loads. `export_merged` also
writes the base with the adapter folded in, for serving without peft.

The reference policy is the base: the adapters switched off (`disable_adapter`). What
leaves for inference (weight sync to a rollout engine) are the adapted layers' merged
weights W + (alpha / r) B A under the base model's Hugging Face names, which any engine
loads into a plain base model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ContextManager

import torch

from orchestrator.methods.base import Method, Reference

_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")


class Lora(Method):
    reference = Reference.WEIGHTS_OFF

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.cfg
        targets = "all-linear" if list(c.target_modules) == ["all-linear"] else list(c.target_modules)
        from peft import LoraConfig, get_peft_model  # on use: importing peft costs ~1.3 s

        peft_cfg = LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=targets,
            bias=c.bias,
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            from orchestrator.errors import ConfigError

            raise ConfigError(f"method.target_modules={list(c.target_modules)}: {exc}") from exc

    def reference_context(self, model: torch.nn.Module) -> ContextManager:
        return model.disable_adapter()

    def hf_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merged weights of the adapted layers (and trained biases), under HF names.

        Written out rather than peft's `merge_and_unload`, which needs the whole unsharded
        model as a module (a second copy per sync); the merge is one matmul per layer and is
        tested equal to peft's (tests/methods/test_lora.py)."""
        scale = self.cfg.alpha / self.cfg.r
        out: dict[str, torch.Tensor] = {}
        for key, a in state.items():
            m = _LORA.match(key)
            if m is None or m.group(2) != "A":
                continue
            layer = m.group(1)
            base = state[f"{layer}.base_layer.weight"]
            b = state[f"{layer}.lora_B.default.weight"]
            delta = (b.float() @ a.float()) * scale
            out[_hf_name(f"{layer}.weight")] = (base.float() + delta).to(base.dtype)
        if self.cfg.bias != "none":
            for key, value in state.items():
                if key.endswith(".bias"):
                    out[_hf_name(key)] = value
        return out

    def export(self, model, out_dir: Path, tokenizer, base_ref) -> dict[str, str]:
        out: dict[str, str] = {}
        if base_ref is None:
            # Locally built base: write it out so the adapter has something to load onto.
            # Only such (small) models get here; hub bases are referenced by id instead.
            base_path = out_dir / "base"
            copy.deepcopy(model).unload().save_pretrained(base_path)
            tokenizer.save_pretrained(base_path)
            base_ref = str(base_path.resolve())
            out["base"] = str(base_path)
        adapter = out_dir / "adapter"
        model.peft_config["default"].base_model_name_or_path = base_ref
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        out["adapter"] = str(adapter)
        if self.cfg.export_merged:  # last: merging rewrites the base weights in place
            merged = out_dir / "merged"
            model.merge_and_unload().save_pretrained(merged)
            tokenizer.save_pretrained(merged)
            out["merged"] = str(merged)
        return out


def _hf_name(key: str) -> str:
    key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    return key.replace(".base_layer.", ".")
