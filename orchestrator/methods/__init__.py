"""Methods: how a role's model is built, which parameters train, the reference policy it
implies and what leaves for inference and export (`orchestrator.methods.base.Method`).

Registry: plain dict, greppable. Adding a method = one file + a line here + its config
(docs/extending.md).
"""

from __future__ import annotations

from typing import Any

from orchestrator.methods.base import Method, Reference
from orchestrator.methods.bitfit import Bitfit
from orchestrator.methods.experts import Experts
from orchestrator.methods.full import Full
from orchestrator.methods.lora import Lora
from orchestrator.methods.qlora import Qlora

METHODS: dict[str, type] = {
    "full": Full,
    "lora": Lora,
    "qlora": Qlora,
    "bitfit": Bitfit,
    "experts": Experts,
}


def get_method(spec: Any) -> Method:
    """The method of a role spec (`orchestrator.roles.RoleSpec`), built with its config and
    the spec as context."""
    cls = getattr(spec, "method_cls", None) or METHODS[spec.method.name]
    return cls(spec.method, spec)


__all__ = ["METHODS", "Method", "Reference", "get_method"]
