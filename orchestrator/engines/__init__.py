"""Engines: one rank of a sharding backend. Registry: plain dict, greppable.

Every engine implements `orchestrator.engines.base.Engine` and passes the shared
conformance tests in tests/engines/.
"""

from __future__ import annotations


def _fsdp2():
    from orchestrator.engines.fsdp2 import FSDP2Engine

    return FSDP2Engine


def _deepspeed_zero3():
    from orchestrator.engines.deepspeed_zero3 import DeepSpeedZero3Engine

    return DeepSpeedZero3Engine


# Factories, so that importing the registry does not import every backend's library.
ENGINES: dict[str, object] = {
    "fsdp2": _fsdp2,
    "deepspeed_zero3": _deepspeed_zero3,
}


def get_engine_class(name: str):
    return ENGINES[name]()
