"""Full fine-tuning: every parameter trains; export is a plain `transformers` model.

The reference policy is a frozen copy of the starting weights (a `reference` role)."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.methods.base import Method, Reference


class Full(Method):
    reference = Reference.FROZEN_COPY

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def export(self, model, out_dir: Path, tokenizer, base_ref) -> dict[str, str]:
        path = out_dir / "hf"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return {"model": str(path)}
