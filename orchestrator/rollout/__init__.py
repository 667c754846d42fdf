"""Rollout: inference engines that sample completions from the current policy.

`RolloutGroup` (driver side) holds `RolloutWorker` actors; each wraps one engine from
`ROLLOUT_ENGINES` (the `rollout.engine` choice) holding an unsharded copy of the policy,
updated by weight sync after every optimizer step and versioned, so that a generation
never mixes two policy versions. Registry: plain dict of factories (an engine's library is
imported only when it is chosen). Adding an engine: docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable


def _hf() -> type:
    from orchestrator.rollout.hf import HfEngine

    return HfEngine


def _vllm() -> type:
    from orchestrator.rollout.vllm import VllmEngine

    return VllmEngine


ROLLOUT_ENGINES: dict[str, Callable[[], type]] = {
    "hf": _hf,
    "vllm": _vllm,
}


def get_engine_class(name: str) -> type:
    return ROLLOUT_ENGINES[name]()
