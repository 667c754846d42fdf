"""Evaluation: score a model served by a rollout engine on held-out items.

Any stage, or a standalone evaluation run, calls these with a rollout group and items;
the `eval` config group sets how many held-out items, how often and with which reward.
Today: greedy accuracy of verifiable generation (a reward function of the completion and
the item's answer, e.g. `math_verify`). Held-out splits come from `orchestrator.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.rollout.base import SamplingParams


def greedy_accuracy(
    rollout, tokenizer, items: Sequence[dict[str, Any]], reward: str, max_new_tokens: int, stop: list[str]
) -> float:
    """Mean reward of one greedy completion per item (`messages` prompt, `answer`)."""
    from orchestrator.data.chat import encode_prompt
    from orchestrator.rewards import resolve

    prompts = [encode_prompt(tokenizer, it["messages"]) for it in items]
    sampling = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, stop=list(stop))
    completions = rollout.generate(prompts, sampling, 0)
    fn = resolve(reward)
    return sum(fn(c.text, it["answer"]) for c, it in zip(completions, items)) / len(items)
