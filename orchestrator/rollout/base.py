"""The rollout-engine seam: generate completions, load weights by version, sleep / wake.

A rollout engine serves one model for RL and evaluation. It is built from the model
spec alone (a plain base model: no adapters, no parametrisations) and receives weights
in the base model's Hugging Face names (`Method.hf_weights`: merged LoRA, merged expert
slices), so any engine that loads a `transformers` checkpoint can serve a policy trained
with any method. Engines are listed in `orchestrator.rollout.ROLLOUT_ENGINES` and chosen
with the top-level `rollout` config group (`rollout=hf`, `rollout=vllm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

COLOCATED_GPU_SHARE = 0.25
"""Share of a train bundle's GPU a colocated rollout actor takes (the policy the rest)."""


@dataclass
class SamplingParams:
    n: int = 1
    """Completions per prompt (grouped: prompt 0's n, then prompt 1's, ...)."""
    temperature: float = 1.0
    """0: greedy (the n completions of a prompt are then identical)."""
    top_p: float = 1.0
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 or -1: off."""
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    """Stop strings besides the tokenizer's EOS (the completion includes the stop text)."""
    logprobs: bool = False
    """Also return each sampled token's log-prob under the sampling distribution (after
    temperature and top-p / top-k)."""


@dataclass
class Completion:
    token_ids: list[int]
    """Completion tokens, ending at and including EOS when it was produced; no padding."""
    text: str
    """The completion decoded without special tokens."""
    logprobs: Optional[list[float]] = None
    """Per-token log-probs when `SamplingParams.logprobs` was set."""


class RolloutEngine:
    """One inference engine instance (inside a rollout worker actor)."""

    cheap_logprobs: bool = False
    """Whether returning the sampled tokens' log-probs costs next to nothing (the engine has
    them anyway). RL stages then ask for them every step, to log the trainer / engine
    mismatch; otherwise only when an off-policy correction needs them (`stage.tis_cap`)."""

    def __init__(self, model_spec, rollout_cfg, tokenizer, device: torch.device):
        self.model_spec, self.cfg, self.tokenizer, self.device = model_spec, rollout_cfg, tokenizer, device

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams, seed: int) -> list[Completion]:
        """`sampling.n` completions per prompt (token ids), grouped by prompt, seeded."""
        raise NotImplementedError

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the named weights (Hugging Face names of the base model) in place."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Release accelerator memory between rollouts (colocated engines); optional."""

    def wake(self) -> None:
        """Take accelerator memory back before the next rollout; optional."""
