"""Methods decide which parameters train and what gets exported.

A method is applied to the full model before sharding. Registry: plain dict, greppable.
"""

from __future__ import annotations

from typing import Dict

from orchestrator.methods.base import Method
from orchestrator.methods.full import Full
from orchestrator.methods.lora import Lora

METHODS: Dict[str, type] = {
    "full": Full,
    "lora": Lora,
}


def get_method(cfg) -> Method:
    return METHODS[cfg.method.name](cfg.method)


__all__ = ["METHODS", "Method", "get_method"]
