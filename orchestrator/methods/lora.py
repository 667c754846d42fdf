"""LoRA via `peft` (Hu et al., arXiv:2106.09685): frozen base, trainable low-rank adapters.

Export writes a PEFT adapter loadable with `PeftModel.from_pretrained`. When the base is
not a hub id or directory (a locally built model), the base is exported beside the
adapter and the adapter points at it, so the pair always loads. `export_merged` also
writes the base with the adapter folded in, for serving without peft.

The reference policy is the base: the adapters switched off (`disable_adapter`). What
leaves for inference (weight sync to a rollout engine) are the adapted layers' merged
weights W + s B A under the base model's Hugging Face names, which any engine loads into a
plain base model (s = alpha / r, or alpha / sqrt(r) with rsLoRA; with DoRA each output row
is then rescaled to its trained magnitude, as peft merges it).

PiSSA and OLoRA initialise the adapters from a decomposition of each base weight (top
singular vectors / a QR decomposition) and leave the residual W - s B0 A0 in the base, so
the model starts equal to the base but "adapters off" is the residual, not the base. Their
reference policy is therefore a frozen copy of the starting model (`Reference.FROZEN_COPY`:
a `reference` role where a stage needs one). The init is deterministic in the base weights,
so every rank (and a resumed run, whose checkpoints hold only the trained weights) computes
the same residual. Export converts the adapter to a plain LoRA adapter of rank 2r on the
original base (peft's `path_initial_model_for_weight_conversion`: delta = s (B A - B0 A0)),
and a locally built base is written as the original base (residual + s B0 A0).
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import ContextManager, Optional

import torch

from orchestrator.errors import ConfigError
from orchestrator.methods.base import Method, Reference

_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")
_MAGNITUDE = "lora_magnitude_vector.default.weight"

PEFT_INITS: dict[str, object] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
"""`method.init_lora_weights` -> peft's `LoraConfig.init_lora_weights`."""
RESIDUAL_INITS = ("pissa", "olora")
"""Inits that move part of each base weight into the adapter (the base keeps the residual)."""


def check_config(cfg) -> None:
    """What the LoRA variants need of the rest of the run (called by LoraMethodConfig.check)."""
    c = cfg.method
    init = str(c.init_lora_weights)
    if init in RESIDUAL_INITS and c.use_dora:
        raise ConfigError(
            f"method.init_lora_weights={init} with method.use_dora=true: the export converts a {init} adapter "
            "into a plain LoRA adapter on the original base, which a DoRA magnitude cannot follow. "
            "Use one of them: method.use_dora=false, or method.init_lora_weights=default."
        )
    used = (["method.use_dora=true"] if c.use_dora else []) + (
        [f"method.init_lora_weights={init}"] if init in RESIDUAL_INITS else []
    )
    if used and cfg.backend.name == "deepspeed_zero3":
        raise ConfigError(
            f"{' and '.join(used)} with backend=deepspeed_zero3 is not supported: DoRA reads each adapted "
            "layer's whole base weight in every forward, and PiSSA/OLoRA keep the initial adapters for export, "
            "while ZeRO-3 keeps every weight partitioned outside its own layer's forward. Use backend=fsdp2."
        )


class Lora(Method):
    def __init__(self, cfg, context=None):
        super().__init__(cfg, context)
        self.initial_adapters: dict[str, torch.Tensor] = {}
        """PiSSA / OLoRA: the adapters as initialised (CPU), which export subtracts."""

    @property
    def init(self) -> str:
        return str(self.cfg.init_lora_weights)

    @property
    def reference(self) -> Reference:  # type: ignore[override]
        """The base with adapters off, except after PiSSA / OLoRA (that is the residual)."""
        return Reference.FROZEN_COPY if self.init in RESIDUAL_INITS else Reference.WEIGHTS_OFF

    @property
    def scale(self) -> float:
        """The adapter's scaling s in W + s B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        c = self.cfg
        return c.alpha / math.sqrt(c.r) if c.use_rslora else c.alpha / c.r

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.cfg
        targets = "all-linear" if list(c.target_modules) == ["all-linear"] else list(c.target_modules)
        from peft import LoraConfig, get_peft_model  # on use: importing peft costs ~1.3 s

        init = PEFT_INITS[self.init]
        # An export skeleton on the meta device gets its weights from the state dict: skip
        # decomposing weights that are not there.
        on_meta = any(p.is_meta for p in model.parameters())
        task = _task_type(model)
        # peft's all-linear keeps a sequence-classification head out of the adapted layers, but
        # not a token-classification one (a critic's value head), which it must train in full
        # (`modules_to_save`): name it.
        exclude = ["score"] if task == "TOKEN_CLS" and targets == "all-linear" and hasattr(model, "score") else None
        peft_cfg = LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=targets,
            bias=c.bias,
            use_dora=c.use_dora,
            use_rslora=c.use_rslora,
            init_lora_weights=True if on_meta and self.init in RESIDUAL_INITS else init,
            task_type=task,
            exclude_modules=exclude,
        )
        try:
            model = get_peft_model(model, peft_cfg)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"method.target_modules={list(c.target_modules)}: {exc}") from exc
        model.peft_config["default"].init_lora_weights = init
        return model

    def apply_seeded(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        model = super().apply_seeded(model, seed)
        if self.init in RESIDUAL_INITS:
            self.initial_adapters = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if _LORA.match(k)
            }
        return model

    def reference_context(self, model: torch.nn.Module) -> ContextManager:
        if self.reference is not Reference.WEIGHTS_OFF:
            return super().reference_context(model)
        return model.disable_adapter()

    def hf_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merged weights of the adapted layers (and trained biases), under HF names.

        Written out rather than peft's `merge_and_unload`, which needs the whole unsharded
        model as a module (a second copy per sync); the merge is one matmul per layer (and a
        row norm with DoRA) and is tested equal to peft's (tests/methods/test_lora.py)."""
        scale = self.scale
        out: dict[str, torch.Tensor] = {}
        for key, a in state.items():
            m = _LORA.match(key)
            if m is None or m.group(2) != "A":
                continue
            layer = m.group(1)
            base = state[f"{layer}.base_layer.weight"]
            b = state[f"{layer}.lora_B.default.weight"]
            merged = base.float() + (b.float() @ a.float()) * scale
            magnitude = state.get(f"{layer}.{_MAGNITUDE}")
            if magnitude is not None:  # DoRA: each output row rescaled to its trained magnitude
                merged = merged * (magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
            out[_hf_name(f"{layer}.weight")] = merged.to(base.dtype)
        if self.cfg.bias != "none":
            for key, value in state.items():
                if key.endswith(".bias"):
                    out[_hf_name(key)] = value
        return out

    def export(self, model, out_dir: Path, tokenizer, base_ref: Optional[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        residual = self.init in RESIDUAL_INITS
        if residual and not self.initial_adapters:
            raise RuntimeError(
                f"init_lora_weights={self.init}: export needs the initial adapters (build the model first)"
            )
        if base_ref is None:
            # Locally built base: write it out so the adapter has something to load onto.
            # Only such (small) models get here; hub bases are referenced by id instead.
            base_path = out_dir / "base"
            base = copy.deepcopy(model)
            if residual:  # the original base: the residual with the initial adapters merged back
                base.load_state_dict(self.initial_adapters, strict=False)
                base = base.merge_and_unload()
            else:
                base = base.unload()
            base.save_pretrained(base_path)
            tokenizer.save_pretrained(base_path)
            base_ref = str(base_path.resolve())
            out["base"] = str(base_path)
        adapter = out_dir / "adapter"
        model.peft_config["default"].base_model_name_or_path = base_ref
        if residual:
            # peft writes B A - B0 A0 as a rank-2r LoRA adapter on the original base; it reads
            # the initial adapter from a directory of its own.
            with tempfile.TemporaryDirectory(prefix="lora_init_") as tmp:
                initial = Path(tmp) / "initial"
                initial.mkdir()
                from safetensors.torch import save_file

                save_file(
                    {k.replace(".default.", "."): v.contiguous() for k, v in self.initial_adapters.items()},
                    str(initial / "adapter_model.safetensors"),
                )
                with warnings.catch_warnings():  # peft warns that the initial adapter sits beside a PiSSA one
                    warnings.filterwarnings("ignore", message=r".*changes the base weights of the model")
                    model.save_pretrained(adapter, path_initial_model_for_weight_conversion=str(initial))
        else:
            model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        out["adapter"] = str(adapter)
        if self.cfg.export_merged:  # last: merging rewrites the base weights in place
            merged = out_dir / "merged"
            model.merge_and_unload().save_pretrained(merged)
            tokenizer.save_pretrained(merged)
            out["merged"] = str(merged)
        return out


def _task_type(model: torch.nn.Module) -> str:
    """peft's task of the model's head: a scalar head (reward model, critic) is new, so peft
    trains it in full beside the adapters (`modules_to_save`)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def _hf_name(key: str) -> str:
    key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    return key.replace(".base_layer.", ".")
