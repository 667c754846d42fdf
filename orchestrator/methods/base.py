from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch


class Method:
    """Which parameters train (`apply`) and how a trained model is written out (`export`)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def export(self, model: torch.nn.Module, out_dir: Path, tokenizer, base_ref: str | None) -> Dict[str, str]:
        """Write `model` (unsharded, on CPU) for `transformers`/`peft`/vLLM; return {kind: path}."""
        raise NotImplementedError


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
