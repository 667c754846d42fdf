"""Preference rows -> prompt / chosen / rejected token ids (for DPO-style stages).

Rows are `{"prompt", "chosen", "rejected"}` with strings or message lists, as SFT rows
(a string prompt is one user message, a string completion one assistant message), or
TRL's implicit-prompt form `{"chosen": messages, "rejected": messages}`, whose shared
leading messages are the prompt. Each side is rendered through the one chat encoder
(`chat.split_completion`), so `prompt_ids` is exactly what a rollout would be given and
`prompt_ids + chosen_ids` is the rendering of the whole chosen conversation.

Truncation: a prompt longer than `max_prompt_len` (when set) is cut from the left to it
(its end, the assistant header, is what the completion follows). Then to `max_seq_len`
(prompt plus the longer completion): the prompt is cut from the left down to
`max_seq_len - longer completion` tokens but never below half of `max_seq_len`; the
completions are then cut from the right to the room left (TRL's `keep_end` prompt
truncation). The tokenizer counts the rows it cut (`truncated`); the stage logs it.
Missing, empty or identical completions are bad rows (`data/bad_rows.py`).
"""

from __future__ import annotations

import logging
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


def cut_prompt_and_completions(
    p: list[int], completions: list[list[int]], max_len: int, max_prompt_len: int | None, truncate: bool
) -> tuple[list[int], list[list[int]], bool]:
    """The truncation rule above, shared by pairs and KTO examples: (prompt, completions, cut?)."""
    cut = False
    if max_prompt_len is not None and len(p) > max_prompt_len:
        if not truncate:
            raise ValueError(
                f"the prompt's {len(p)} tokens exceed data.max_prompt_len={max_prompt_len} "
                "(set data.truncate=true to cut it)"
            )
        p, cut = p[len(p) - max_prompt_len :], True
    longest = max(len(c) for c in completions)
    if len(p) + longest > max_len:
        if not truncate:
            raise ValueError(
                f"{len(p) + longest} tokens exceed data.max_seq_len={max_len} (set data.truncate=true to cut them)"
            )
        keep = max(max_len - longest, min(len(p), max_len // 2))
        p, completions, cut = p[len(p) - keep :], [c[: max_len - keep] for c in completions], True
    return p, completions, cut


class PairTokenizer:
    """(prompt, chosen, rejected) messages -> `{"prompt_ids", "chosen_ids", "rejected_ids"}`."""

    def __init__(self, tokenizer: Any, max_seq_len: int, truncate: bool, max_prompt_len: int | None = None):
        require_chat_template(tokenizer)
        self.tok = tokenizer
        self.max_len = max_seq_len
        self.max_prompt_len = max_prompt_len
        self.truncate = truncate
        self.truncated = 0
        """Pairs cut so far (prompt, completions or both)."""

    def __call__(self, prompt: Messages, chosen: Messages, rejected: Messages) -> Pair:
        p, c = split_completion(self.tok, prompt, chosen)
        _, r = split_completion(self.tok, prompt, rejected)
        budget = self.max_len
        p, (c, r), cut = cut_prompt_and_completions(p, [c, r], budget, self.max_prompt_len, self.truncate)
        if cut:
            self.truncated += 1
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
    enc = PairTokenizer(tokenizer, d.max_seq_len, d.truncate, d.max_prompt_len)
    pairs = parse_rows(rows, lambda row: enc(*to_pair(row)), d, "preference rows")
    log_truncated(enc.truncated, len(pairs), "pairs", d)
    return pairs


def log_truncated(n: int, total: int, what: str, d: DataConfig) -> None:
    """One line when rows were cut: how many, and by which limits."""
    if n:
        limits = f"data.max_seq_len={d.max_seq_len}"
        if d.max_prompt_len is not None:
            limits = f"data.max_prompt_len={d.max_prompt_len}, {limits}"
        logging.getLogger("orchestrator").info(f"{n} of {total} {what} truncated ({limits})")
