"""Methods decide which parameters train and what gets exported.

A method is applied to the full model before sharding. Registry: plain dict, greppable.
"""

from __future__ import annotations

from typing import Dict

from orchestrator.methods.base import Method
from orchestrator.methods.experts import Experts
from orchestrator.methods.full import Full
from orchestrator.methods.lora import Lora

METHODS: Dict[str, type] = {
    "full": Full,
    "lora": Lora,
    "experts": Experts,
}


def get_method(cfg) -> Method:
    cls = METHODS[cfg.method.name]
    # Methods that read the training data or the run dir (experts) get the whole config.
    if getattr(cls, "needs_run_config", False):
        return cls(cfg.method, run_cfg=cfg)
    return cls(cfg.method)


__all__ = ["METHODS", "Method", "get_method"]
