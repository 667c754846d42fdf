"""Preference rows -> prompt / chosen / rejected token ids (for DPO-style stages).

Rows are `{"prompt", "chosen", "rejected"}` with strings or message lists, as SFT rows
(a string prompt is one user message, a string completion one assistant message), or
TRL's implicit-prompt form `{"chosen": messages, "rejected": messages}`, whose shared
leading messages are the prompt. Each side is rendered through the one chat encoder
(`chat.split_completion`), so `prompt_ids` is exactly what a rollout would be given and
`prompt_ids + chosen_ids` is the rendering of the whole chosen conversation.

Truncation to `max_seq_len` (prompt plus the longer completion): the prompt is cut from
the left (its end, the assistant header, is what the completion follows), down to
`max_seq_len - longer completion` tokens but never below half of `max_seq_len`; the
completions are then cut from the right to the room left (TRL's `keep_end` prompt
truncation). Missing, empty or identical completions are bad rows (`data/bad_rows.py`).
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import parse_rows
from orchestrator.data.chat import (
    Messages,
    as_messages,
    check_messages,
    require_chat_template,
    split_completion,
)
from orchestrator.data.sources import RawRow

Pair = dict[str, list[int]]


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[Messages, Any, Any]:
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ValueError(  # noqa: TRY004 (a bad row: ValueError is the bad-row signal)
            "without 'prompt', 'chosen' and 'rejected' must be message lists sharing their prompt"
        )
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise ValueError("'chosen' and 'rejected' share no leading messages; give the prompt as 'prompt'")
    return chosen[:k], chosen[k:], rejected[k:]


def to_pair(row: dict[str, Any]) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of a preference row."""
    if "chosen" not in row or "rejected" not in row:
        raise ValueError(
            f"preference row needs 'chosen' and 'rejected' (found keys: {', '.join(sorted(row)) or 'none'})"
        )
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = _implicit_prompt(row["chosen"], row["rejected"])
    prompt = check_messages(as_messages(prompt, "prompt", "user"), "prompt")
    sides = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        msgs = check_messages(as_messages(value, field, "assistant"), field)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"'{field}' has no assistant message")
        sides.append(msgs)
    if sides[0] == sides[1]:
        raise ValueError("'chosen' and 'rejected' are identical")
    return prompt, sides[0], sides[1]


class PairTokenizer:
    """(prompt, chosen, rejected) messages -> `{"prompt_ids", "chosen_ids", "rejected_ids"}`."""

    def __init__(self, tokenizer: Any, max_seq_len: int, truncate: bool):
        require_chat_template(tokenizer)
        self.tok = tokenizer
        self.max_len = max_seq_len
        self.truncate = truncate

    def __call__(self, prompt: Messages, chosen: Messages, rejected: Messages) -> Pair:
        p, c = split_completion(self.tok, prompt, chosen)
        _, r = split_completion(self.tok, prompt, rejected)
        longest, budget = max(len(c), len(r)), self.max_len
        if len(p) + longest > budget:
            if not self.truncate:
                raise ValueError(
                    f"{len(p) + longest} tokens exceed data.max_seq_len={budget} (set data.truncate=true to cut them)"
                )
            keep = max(budget - longest, min(len(p), budget // 2))
            p, c, r = p[len(p) - keep :], c[: budget - keep], r[: budget - keep]
            if c == r:
                raise ValueError(
                    f"'chosen' and 'rejected' are identical in their first {len(c)} tokens, "
                    f"all that data.max_seq_len={budget} leaves (raise it)"
                )
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}


def tokenize_pairs(rows: list[RawRow], tokenizer: Any, d: DataConfig) -> list[Pair]:
    """Tokenize every preference row to `d.max_seq_len` (cut when `d.truncate`); bad rows
    fail the run or are skipped, per `d.on_bad_rows`."""
    if not rows:
        return parse_rows(rows, dict, d)  # raises: no rows
    enc = PairTokenizer(tokenizer, d.max_seq_len, d.truncate)
    return parse_rows(rows, lambda row: enc(*to_pair(row)), d, "preference rows")
