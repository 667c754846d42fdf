"""Turn chat or prompt/completion rows into token ids with a completion-only loss mask.

Rows are either `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`
(strings, or message lists as in TRL's conversational format). The tokenizer's chat
template renders them. Labels are -100 everywhere except assistant turns: each assistant
turn's tokens are found by rendering the conversation up to that turn with and without
it. That needs a prefix-stable template (rendering k messages is a prefix of rendering
k+1), which holds for ChatML, Llama-3 and Qwen templates; a template that breaks it is
reported instead of silently mis-masking.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence

from orchestrator.config.schema import DataConfig
from orchestrator.data.sources import RawRow, as_dict
from orchestrator.errors import DataError

log = logging.getLogger(__name__)
IGNORE = -100
_ROLES = {"system", "user", "assistant", "tool"}


def to_messages(row: Dict[str, Any], fmt: str) -> List[Dict[str, str]]:
    if fmt in ("auto", "messages") and "messages" in row:
        msgs = row["messages"]
    elif fmt in ("auto", "prompt_completion") and "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
        completion = [{"role": "assistant", "content": c}] if isinstance(c, str) else c
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise ValueError("'prompt' and 'completion' must be strings or lists of messages")
        msgs = prompt + completion
    else:
        want = {"auto": "'messages', or 'prompt' and 'completion'", "messages": "'messages'",
                "prompt_completion": "'prompt' and 'completion'"}[fmt]
        raise ValueError(f"row needs {want} (found keys: {', '.join(sorted(row)) or 'none'})")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant message: nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


class SftTokenizer:
    def __init__(self, tokenizer, max_seq_len: int, truncate: bool, train_on_prompt: bool):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template, so chat rows cannot be rendered. Set "
                "model.chat_template to a Jinja template (or use the tokenizer of the model's "
                "instruct variant via model.tokenizer).")
        self.tok = tokenizer
        self.max_len = max_seq_len
        self.truncate = truncate
        self.train_on_prompt = train_on_prompt

    def _ids(self, msgs, add_generation_prompt: bool) -> List[int]:
        text = self.tok.apply_chat_template(msgs, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, msgs: Sequence[Dict[str, str]]) -> Dict[str, List[int]]:
        ids = self._ids(msgs, False)
        labels = list(ids) if self.train_on_prompt else [IGNORE] * len(ids)
        if not self.train_on_prompt:
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                start = len(self._ids(msgs[:i], True)) if i else 0
                upto = self._ids(msgs[: i + 1], False)
                end = len(upto)
                if upto != ids[:end]:
                    raise DataError("the chat template is not prefix-stable (rendering the first "
                                    "messages is not a prefix of rendering all), so assistant tokens "
                                    "cannot be located. Set model.chat_template to a template that is.")
                labels[start:end] = ids[start:end]
        if len(ids) > self.max_len:
            if not self.truncate:
                raise ValueError(f"{len(ids)} tokens exceed data.max_seq_len={self.max_len} "
                                 "(set data.truncate=true to cut them)")
            ids, labels = ids[: self.max_len], labels[: self.max_len]
        if all(label == IGNORE for label in labels[1:]):
            raise ValueError(f"the prompt fills data.max_seq_len={self.max_len} tokens, leaving no "
                             "completion tokens to train on (raise data.max_seq_len or shorten it)")
        return {"input_ids": ids, "labels": labels}


def tokenize_rows(rows: List[RawRow], tokenizer, d: DataConfig,
                  train_on_prompt: bool) -> List[Dict[str, List[int]]]:
    """Tokenize every row; malformed rows fail the run, or are skipped up to a threshold."""
    if not rows:
        raise DataError(f"data.source={d.source!r} has no rows")
    enc = SftTokenizer(tokenizer, d.max_seq_len, d.truncate, train_on_prompt)
    out, bad = [], []
    for row in rows:
        try:
            out.append(enc(to_messages(as_dict(row), d.format)))
        except ValueError as exc:
            if d.on_bad_rows == "error":
                raise DataError(f"{row.where}: {exc}. Fix the row, or set data.on_bad_rows=skip "
                                f"to skip up to data.max_bad_rows_fraction of rows.") from exc
            bad.append(f"{row.where}: {exc}")
    if bad:
        frac = len(bad) / len(rows)
        if frac > d.max_bad_rows_fraction:
            raise DataError(f"{len(bad)} of {len(rows)} rows are malformed ({frac:.1%} > "
                            f"data.max_bad_rows_fraction={d.max_bad_rows_fraction}); first: {bad[0]}")
        log.warning("skipped %d malformed rows of %d (first: %s)", len(bad), len(rows), bad[0])
    if not out:
        raise DataError(f"data.source={d.source!r}: no usable rows")
    return out
