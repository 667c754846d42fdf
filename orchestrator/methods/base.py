"""The Method seam: how a role's model is built, which parameters train, what the
reference policy is, and what leaves for inference and export.

One build path serves every engine, the rollout workers and any future role:
`Method.build(spec, dtype)` turns a model spec into the module to shard. A method that
changes how the base loads (a 4-bit base) overrides `load_base`; one that changes which
parameters train overrides `apply`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch


class Reference(str, enum.Enum):
    """How a method yields the reference policy (the model training started from)."""

    WEIGHTS_OFF = "weights_off"
    """The base is intact under the trained weights: switch them off (LoRA, expert slices)."""
    FROZEN_COPY = "frozen_copy"
    """Every weight trains: a frozen copy of the starting weights (a `reference` role)."""


class Method:
    """Which parameters train (`apply`) and how a trained model is written out (`export`)."""

    reference: Reference = Reference.FROZEN_COPY

    def __init__(self, cfg, context: Any = None):
        self.cfg = cfg
        self.context = context
        """The role spec (model, data, run dir) for methods that read more than their own config."""

    # ----------------------------------------------------------------- build
    def build(self, model_spec, dtype: torch.dtype, seed: int, head: str = "lm") -> torch.nn.Module:
        """The module to shard: the base (`load_base`) with the method applied. New
        parameters are drawn from `seed`, so they are identical on every rank (each rank keeps
        only its shard of its own copy: differing inits would stitch a mixed tensor)."""
        return self.apply_seeded(self.load_base(model_spec, dtype, head), seed)

    def apply_seeded(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        """`apply` with new parameters drawn from `seed`, leaving the caller's RNG as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.apply(model)

    def load_base(self, model_spec, dtype: torch.dtype, head: str = "lm") -> torch.nn.Module:
        """The base model of `model_spec` with its head (`lm`, or a scalar `score` / `value` head)."""
        from orchestrator.models import build_model

        return build_model(model_spec, dtype, head)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def quantized_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules holding quantized weights (a 4-bit base), which a backend must gather as
        stored: a cast to the compute dtype would destroy their packed codes."""
        return []

    def memory_stats(self, model: torch.nn.Module) -> dict[str, int]:
        """Byte counts worth logging once the backend has placed `model` (this rank's share),
        e.g. a quantized base against the same base in float; logged by the driver."""
        return {}

    # ------------------------------------------------------------- reference
    def reference_context(self, model: torch.nn.Module) -> ContextManager:
        """Inside it, `model` computes the reference policy (methods with WEIGHTS_OFF)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no reference inside the policy; the stage uses a frozen `reference` role"
        )

    # ------------------------------------------------------------- inference
    def hf_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full (unsharded) training-time state dict -> the weights that changed, under
        the base model's Hugging Face parameter names (merged where the method trains a
        reparametrisation), so any inference engine loads them into a plain base model."""
        return {k: v for k, v in state.items()}

    def float_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full training-time state dict as a float model of the same structure holds it
        (a quantized base de-quantized); what export loads into its skeleton."""
        return dict(state)

    def export(self, model: torch.nn.Module, out_dir: Path, tokenizer, base_ref: Optional[str]) -> dict[str, str]:
        """Write `model` (unsharded, on CPU) for `transformers`/`peft`/vLLM; return {kind: path}."""
        raise NotImplementedError


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `transformers` model inside a peft or DeepSpeed wrapper."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    return model.get_base_model() if hasattr(model, "get_base_model") else model
