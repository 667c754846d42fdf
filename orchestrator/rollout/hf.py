"""`hf` rollout engine: `transformers` `generate` (KV cache, batched, left-padded prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orchestrator.rollout.base import Completion, RolloutEngine, SamplingParams


class HfEngine(RolloutEngine):
    def __init__(self, model_spec, rollout_cfg, tokenizer, device: torch.device):
        super().__init__(model_spec, rollout_cfg, tokenizer, device)
        from orchestrator.models import build_model, resolve_dtype

        dtype = (
            torch.float32
            if model_spec.dtype == "auto" and device.type == "cpu"
            else resolve_dtype(model_spec, device.type == "cuda")
        )
        self.model = build_model(model_spec, dtype, packed_rows=False).to(device).eval()
        self.model.generation_config.use_cache = True

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        _, unexpected = self.model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise RuntimeError(
                f"weight sync sent keys the rollout model lacks: {unexpected[:3]} (weights "
                "must arrive under the base model's Hugging Face names)"
            )

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams, seed: int) -> list[Completion]:
        torch.manual_seed(seed)
        ids, lps = generate(self.model, self.tokenizer, prompts, sampling, self.cfg.batch_size, self.device)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [Completion(i, t, lp) for i, t, lp in zip(ids, texts, lps)]


def generate(
    model, tokenizer, prompts: Sequence[list[int]], sampling: SamplingParams, batch_size: int, device: torch.device
) -> tuple:
    """n completions per prompt (grouped: prompt 0's n, then prompt 1's, ...), each ending at
    and including EOS when it was produced, without padding; and their per-token log-probs
    under the sampling distribution, after temperature and top-p / top-k (None unless
    `sampling.logprobs`; they come from every generation step's full-vocabulary scores, which
    `generate` then keeps until it returns)."""
    out: list[list[int]] = []
    lps: list[Any] = []
    pad, eos, n = tokenizer.pad_token_id, tokenizer.eos_token_id, sampling.n
    greedy = sampling.temperature == 0
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            num_return_sequences=1 if greedy else n,
            do_sample=not greedy,
        )
        if not greedy:  # transformers' "off" for top_k is 0 (vLLM also reads -1 so)
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
        if sampling.logprobs:
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            res = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        seqs = res.sequences if sampling.logprobs else res
        scores = (
            model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True)
            if sampling.logprobs
            else None
        )
        for r, row in enumerate(seqs[:, width:].tolist()):
            comp = _trim(row, pad, eos)
            out.append(comp)
            lps.append(scores[r, : len(comp)].tolist() if scores is not None else None)
        if greedy and n > 1:  # greedy samples are identical: repeat instead of recomputing
            out[-len(chunk) :] = [c for c in out[-len(chunk) :] for _ in range(n)]
            lps[-len(chunk) :] = [lp for lp in lps[-len(chunk) :] for _ in range(n)]
    return out, lps


def _trim(row: list[int], pad: int, eos: int) -> list[int]:
    """A generated row up to and including EOS, without the padding after it."""
    comp = []
    for t in row:
        if t == pad and t != eos:
            break
        comp.append(t)
        if t == eos:
            break
    return comp
