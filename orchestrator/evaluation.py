"""Evaluation: score a model on items, through the rollout engine and a frozen role.

Any stage calls these with a rollout group and items; the `eval` config group sets how
many held-out items, how often and with which reward. `greedy_accuracy` is the in-run
check of training stages (a reward function of the completion and the item's answer,
e.g. `math_verify`). `ModelScorer` is one model as the evaluation stage's tasks see it
(orchestrator/evals/tasks.py): completions from its rollout engine, and summed log-probs
of given completions (or documents) from its frozen worker group (`forward_logprobs`, sharded over the
group's ranks like any micro-batch). Held-out splits come from `orchestrator.data`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from orchestrator.rollout.base import Completion, SamplingParams


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


def rewards_of(completions: Sequence[Completion], answers: Sequence[Any], reward: str) -> list[float]:
    """`reward(completion text, answer)` per completion (`answers` aligned with them)."""
    from orchestrator.rewards import resolve

    fn = resolve(reward)
    return [float(fn(c.text, a)) for c, a in zip(completions, answers)]


class ModelScorer:
    """One model of an evaluation: its tokenizer, its rollout engine (built on first use by
    `make_rollout`) and its frozen worker group (None when no task needs log-probs)."""

    def __init__(self, name: str, tokenizer, make_rollout: Callable[[], Any], group=None, micro_batch: int = 8):
        self.name, self.tokenizer, self.group, self.micro_batch = name, tokenizer, group, micro_batch
        self.max_length: Optional[int] = None
        """The model's context length (tokens), when known."""
        self._make_rollout = make_rollout
        self._rollout: Optional[Any] = None

    @property
    def rollout(self):
        if self._rollout is None:
            self._rollout = self._make_rollout()
        return self._rollout

    def generate(self, prompts: Sequence[Sequence[dict[str, str]]], sampling: SamplingParams, seed: int):
        """`sampling.n` completions per prompt (message lists), grouped by prompt."""
        from orchestrator.data.chat import encode_prompt

        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        return self.rollout.generate(ids, sampling, seed)

    def completion_logprobs(
        self, pairs: Sequence[tuple[Sequence[dict[str, str]], Sequence[dict[str, str]]]]
    ) -> list[tuple[float, int]]:
        """(summed log-prob, token count) of each completion (messages) after its prompt, the
        completion's tokens being exactly those a rollout would generate after that prompt."""
        from orchestrator.data.chat import split_completion

        rows = []
        for prompt, completion in pairs:
            p, c = split_completion(self.tokenizer, prompt, completion)
            rows.append({"input_ids": p + c, "prompt_len": len(p), "weight": 1.0, "adv": 0.0})
        return self.row_logprobs(rows)

    def row_logprobs(self, rows: list[dict[str, Any]]) -> list[tuple[float, int]]:
        """Summed log-prob and count of each RL-collated row's targets, sharded over the ranks."""
        from orchestrator.data.batching import shard
        from orchestrator.data.collate import rl_collate, rl_dummy

        world, pad = self.group.world_size, self.tokenizer.pad_token_id
        per_rank = shard(rows, world, self.micro_batch, pad, lambda rs: rl_collate(rs, pad), rl_dummy(pad))
        results = self.group.call_per_rank("forward_logprobs", per_rank)
        out: list[Optional[tuple[float, int]]] = [None] * len(rows)
        for rank, (mbs, logps) in enumerate(zip(per_rank, results)):
            mine = list(range(rank, len(rows), world))  # shard's strided split, in micro-batch order
            flat = [(mb["weights"][b], lp[b]) for mb, lp in zip(mbs, logps) for b in range(lp.shape[0])]
            for i, (w, lp) in zip(mine, flat):
                out[i] = (float((lp * w).sum()), int((w > 0).sum()))
        return out  # type: ignore[return-value]

    def text_logprobs(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(summed log-prob, token count) of each document, tokenized as continued pretraining
        reads it (the tokenizer's own special tokens, then EOS): every token after the first."""
        eos = self.tokenizer.eos_token_id
        rows = []
        for text in texts:
            ids = list(self.tokenizer(text)["input_ids"])
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            rows.append({"input_ids": ids, "prompt_len": 1, "weight": 1.0, "adv": 0.0})
        return self.row_logprobs(rows)

    def close(self) -> None:
        if self._rollout is not None:
            self._rollout.shutdown()
            self._rollout = None
