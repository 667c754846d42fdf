"""Generation with `transformers` `generate` (KV cache, batched, left-padded prompts)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch


def generate(model, tokenizer, prompts: Sequence[List[int]], n: int, sampling: Dict[str, Any],
             batch_size: int, device: torch.device) -> List[List[int]]:
    """n completions per prompt (grouped: prompt 0's n, then prompt 1's, ...), each ending at
    and including EOS when it was produced, without padding."""
    out: List[List[int]] = []
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    greedy = sampling["temperature"] == 0
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kwargs: Dict[str, Any] = dict(max_new_tokens=sampling["max_new_tokens"], pad_token_id=pad,
                                      eos_token_id=eos, num_return_sequences=1 if greedy else n,
                                      do_sample=not greedy)
        if not greedy:
            kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0)
        if sampling.get("stop"):
            kwargs.update(stop_strings=list(sampling["stop"]), tokenizer=tokenizer)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row in seqs[:, width:].tolist():
            comp = []
            for t in row:
                if t == pad and t != eos:
                    break
                comp.append(t)
                if t == eos:
                    break
            out.append(comp)
        if greedy and n > 1:  # greedy samples are identical: repeat instead of recomputing
            out[-len(chunk):] = [c for c in out[-len(chunk):] for _ in range(n)]
    return out
