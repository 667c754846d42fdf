"""Unpaired preference rows -> prompt / completion ids with a desirability label (for KTO).

Rows are `{"prompt", "completion", "label"}` (strings or message lists, as SFT rows; `label`
true for a desirable completion), or preference pairs `{"prompt", "chosen", "rejected"}`
in any form `data/preference.py` reads, which give two examples each: the chosen completion
desirable, the rejected one not (TRL's `unpair_preference_dataset`). Both sides render
through the one chat encoder, so `prompt_ids` is what a rollout would be given.

Truncation to `max_prompt_len` and `max_seq_len` follows `PairTokenizer`: the prompt is cut from the left down
to `max_seq_len - completion` tokens but never below half of `max_seq_len`, the completion
from the right to the room left. A missing or non-boolean label, an empty completion or a
malformed pair is a bad row (`data/bad_rows.py`).
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import parse_rows
from orchestrator.data.chat import Messages, as_messages, check_messages, require_chat_template, split_completion
from orchestrator.data.preference import cut_prompt_and_completions, log_truncated, to_pair
from orchestrator.data.sources import RawRow

Example = dict[str, Any]
"""{"prompt_ids": [...], "completion_ids": [...], "label": bool}"""


def to_examples(row: dict[str, Any]) -> list[tuple[Messages, Messages, bool]]:
    """(prompt, completion, desirable) messages of an unpaired row, or both sides of a pair."""
    if "chosen" in row or "rejected" in row:
        prompt, chosen, rejected = to_pair(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    missing = [k for k in ("prompt", "completion", "label") if k not in row]
    if missing:
        raise ValueError(
            f"KTO row needs 'prompt', 'completion' and 'label' (or 'chosen' and 'rejected'); missing {missing}"
        )
    label = row["label"]
    if label not in (True, False, 0, 1) or isinstance(label, float):
        raise ValueError(f"'label' must be true or false, got {label!r}")
    prompt = check_messages(as_messages(row["prompt"], "prompt", "user"), "prompt")
    completion = check_messages(as_messages(row["completion"], "completion", "assistant"), "completion")
    return [(prompt, completion, bool(label))]


class ExampleTokenizer:
    """(prompt, completion, label) messages -> `{"prompt_ids", "completion_ids", "label"}`."""

    def __init__(self, tokenizer: Any, max_seq_len: int, truncate: bool, max_prompt_len: int | None = None):
        require_chat_template(tokenizer)
        self.tok, self.max_len, self.truncate = tokenizer, max_seq_len, truncate
        self.max_prompt_len = max_prompt_len
        self.truncated = 0

    def __call__(self, prompt: Messages, completion: Messages, label: bool) -> Example:
        p, c = split_completion(self.tok, prompt, completion)
        p, (c,), cut = cut_prompt_and_completions(p, [c], self.max_len, self.max_prompt_len, self.truncate)
        self.truncated += cut
        return {"prompt_ids": p, "completion_ids": c, "label": label}


def tokenize_unpaired(rows: list[RawRow], tokenizer: Any, d: DataConfig) -> list[Example]:
    """Tokenize every row (pairs give two examples) to `d.max_seq_len`; bad rows fail the run
    or are skipped, per `d.on_bad_rows`."""
    if not rows:
        return parse_rows(rows, dict, d)  # raises: no rows
    enc = ExampleTokenizer(tokenizer, d.max_seq_len, d.truncate, d.max_prompt_len)
    per_row = parse_rows(rows, lambda row: [enc(*ex) for ex in to_examples(row)], d, "KTO rows")
    examples = [ex for exs in per_row for ex in exs]
    log_truncated(enc.truncated, len(examples), "examples", d)
    return examples
