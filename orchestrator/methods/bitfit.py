"""BitFit (Ben Zaken et al., arXiv:2106.10199): only the bias terms train, every other
parameter is frozen.

The biases change in place, so like `full` the reference policy is a frozen copy of the
starting weights (a `reference` role), and export is a plain `transformers` model. What
leaves for inference (weight sync to a rollout engine) are the biases alone, under their
Hugging Face names.

A model without bias terms (Llama, Mistral, Qwen3: linear layers without bias) has nothing
to train: validation says so (checked on the model built on the meta device) and names a
model that has them (Qwen2 / Qwen2.5: attention q/k/v biases; `model=tiny_qwen2` locally).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from orchestrator.errors import ConfigError, ModelLoadError
from orchestrator.methods.base import Reference
from orchestrator.methods.full import Full


def bias_names(model: torch.nn.Module) -> list[str]:
    """Names of the bias parameters of `model`."""
    return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]


def no_biases_error(label: str) -> ConfigError:
    return ConfigError(
        f"method=bitfit trains bias terms only, but model {label} has no bias parameters. Use a model with "
        "biases (e.g. Qwen2 / Qwen2.5, whose attention q/k/v projections have them; model=tiny_qwen2 locally), "
        "or method=lora."
    )


def _label(m) -> str:
    return m.pretrained or f"{m.name} (arch {m.arch})"


def check_config(cfg) -> None:
    """The model has bias terms (called by BitfitMethodConfig.check): built on the meta device,
    from its config only (a hub model's config.json)."""
    from transformers import AutoModelForCausalLM

    from orchestrator.models import model_config

    try:
        config = model_config(cfg.model)
    except ModelLoadError:
        return  # unreachable config: the load reports it, with the offline hint
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if not bias_names(model):
        raise no_biases_error(_label(cfg.model))


class Bitfit(Full):
    reference = Reference.FROZEN_COPY

    def __init__(self, cfg, context=None):
        super().__init__(cfg, context)
        self.trained: set[str] = set()
        """Names of the parameters that train (the biases)."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        names = set(bias_names(model))
        if not names:
            m = getattr(self.context, "model", None)
            raise no_biases_error(_label(m) if m is not None else type(model).__name__)
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        self.trained = names
        return model

    def hf_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The biases (the only weights that change), under their HF names."""
        trained = self.trained or {k for k in state if k.endswith(".bias")}
        return {k: v for k, v in state.items() if k in trained}
