"""Verifiable reward functions, chosen by config.

A reward function is `fn(completion: str, answer: str, **kwargs) -> float`. Built-ins are
in REWARDS (a plain dict); anything else is named by import path `package.module:function`.
They run in a separate process pool with a timeout (orchestrator.rewards.runner), so one
that raises or hangs is counted and its samples are masked, and the run goes on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from orchestrator.rewards.math import exact_match, format_regex, math_verify

REWARDS: dict[str, Callable[..., float]] = {
    "math_verify": math_verify,
    "exact_match": exact_match,
    "format": format_regex,
}


def resolve(name: str) -> Callable[..., float]:
    if name in REWARDS:
        return REWARDS[name]
    mod, sep, attr = name.partition(":")
    if not sep:
        raise KeyError(
            f"unknown reward {name!r}; built-ins: {', '.join(REWARDS)}, "
            "or give an import path 'package.module:function'"
        )
    return getattr(importlib.import_module(mod), attr)
