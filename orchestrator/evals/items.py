"""Evaluation items: what each task kind reads, from its own source or from the held-out split
of the candidate's training data.

* generation: `{"messages", "answer"}` (as `data.prompts` reads RL prompts);
* preference: the same, the answer optional (None without one);
* nll: a conversation, the last message being the assistant's reference answer, or a
  document `{"text"}` (text rows, as continued pretraining reads them: general text to
  watch forgetting);
* choice: `{"messages", "choices": [str, ...], "answer": index}` from rows with `prompt` (or
  `question`), `choices` and `answer` (the index, or the text of the right choice).

A task without a source evaluates the held-out split of the candidate's training data
(`data.heldout`: only generated sources have one). A source that *is* the candidate's
training data is read through that split too, so an evaluation never scores rows the
candidate trained on. Other sources are evaluation sets: their first `n` distinct items,
in source order. The same config always gives the same items.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import parse_rows
from orchestrator.data.chat import as_messages, check_messages
from orchestrator.data.heldout import heldout_conversations, heldout_prompts, heldout_texts
from orchestrator.data.prompts import load_prompts, prompt_rows
from orchestrator.data.sft import to_messages
from orchestrator.data.sources import load_rows
from orchestrator.errors import ConfigError

Item = dict[str, Any]


def source_label(source: Optional[str]) -> str:
    """A short name for a source, for task names: `heldout`, a generator's or a file's stem."""
    if source is None:
        return "heldout"
    tail = source.split(":", 1)[1] if re.match(r"^(synthetic|hf):", source) else Path(source).stem
    return re.sub(r"[^\w]+", "_", tail).strip("_").lower() or "data"


def items_hash(items: list[Any]) -> str:
    """sha256 of the items as canonical JSON: names exactly what was evaluated."""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def is_verifiable(d: DataConfig) -> bool:
    """Whether the rows of `d` carry an `answer` to check generations against."""
    rows = load_rows(replace(d, num_samples=min(d.num_samples or 64, 64)))
    return bool(rows) and all(isinstance(r.value, dict) and "answer" in r.value for r in rows)


def load_items(kind: str, source: Optional[str], split: str, n: int, train: Optional[DataConfig], key: str) -> list:
    """Up to `n` items of a task of `kind` (see the module docstring); `train` is the
    candidate's training data when known; `key` names the task's config in errors."""
    if source is None or (train is not None and source == train.source):
        items = _heldout(kind, train, n, key)
    else:
        items = _from_source(kind, _data_config(source, split, n), n)
    if not items:
        raise ConfigError(f"{key}: no items (source {source or 'held-out split'}); give a source with rows")
    return items


def _heldout(kind: str, train: Optional[DataConfig], n: int, key: str) -> list:
    if train is None:
        raise ConfigError(
            f"{key} has no source and the candidate's training data is unknown (it is not a run "
            "directory of this project); give the task a source, e.g. {kind: nll, source: eval.jsonl}"
        )
    if kind == "choice":
        raise ConfigError(f"{key}: a choice task needs a source whose rows have 'choices'")
    if not train.source.startswith("synthetic:"):
        raise ConfigError(
            f"{key}: the candidate's training data ({train.source}) has no held-out split (only "
            "generated sources have one); give the task a source of evaluation rows"
        )
    if kind == "nll":
        if is_text(train):
            return [{"text": t} for t in heldout_texts(train, n)]
        return heldout_conversations(train, n)
    return heldout_prompts(train, load_prompts(train), n)


def _is_text_row(row: Any) -> bool:
    return isinstance(row, dict) and "text" in row and "messages" not in row and "prompt" not in row


def is_text(d: DataConfig) -> bool:
    """Whether the rows of `d` are documents (`{"text"}`) rather than chat or prompt rows."""
    rows = load_rows(replace(d, num_samples=min(d.num_samples or 16, 16)))
    return bool(rows) and all(_is_text_row(r.value) for r in rows)


def _nll_item(row: dict[str, Any]) -> Any:
    if _is_text_row(row):
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        return {"text": row["text"]}
    return to_messages(row, "auto")


def _data_config(source: str, split: str, n: int) -> DataConfig:
    # generators make as many rows as asked: draw extra so that n distinct items remain
    rows = 4 * n if source.startswith("synthetic:") else 0
    return DataConfig(source=source, split=split, num_samples=rows)


def _from_source(kind: str, d: DataConfig, n: int) -> list:
    rows = load_rows(d)
    if kind in ("generation", "preference"):
        parsed: list = prompt_rows(rows, d, need_answer=kind == "generation")
    elif kind == "nll":
        parsed = parse_rows(rows, _nll_item, d, "conversations or documents")
    else:
        parsed = parse_rows(rows, _choice_item, d, "multiple-choice rows")
    return _distinct(parsed, n)


def _distinct(items: list, n: int) -> list:
    out: dict[str, Any] = {}
    for it in items:
        out.setdefault(json.dumps(it, sort_keys=True), it)
    return list(out.values())[:n]


def _choice_item(row: dict[str, Any]) -> Item:
    prompt = row.get("prompt", row.get("question"))
    choices, answer = row.get("choices"), row.get("answer")
    if prompt is None or not isinstance(choices, list) or len(choices) < 2 or answer is None:
        raise ValueError(
            "a multiple-choice row needs 'prompt' (or 'question'), 'choices' (a list of at least two "
            f"strings) and 'answer' (found keys: {', '.join(sorted(row)) or 'none'})"
        )
    choices = [str(c) for c in choices]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"'answer' {answer} is not an index of the {len(choices)} choices")
        index = answer
    elif str(answer) in choices:
        index = choices.index(str(answer))
    else:
        raise ValueError(f"'answer' {answer!r} is neither a choice index nor one of the choices")
    msgs = check_messages(as_messages(prompt, "prompt", "user"), "prompt")
    return {"messages": msgs, "choices": choices, "answer": index}
