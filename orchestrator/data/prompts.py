"""Prompt data for RL stages and evaluation: rows with a prompt and a verifiable answer.

Accepted rows: `{"prompt": str | messages, "answer": str}`; GSM8K style
`{"question": str, "answer": "... #### 72"}` (the number after #### is the answer);
and SFT-style `{"prompt", "completion"}` (the completion is the answer). A row without
an answer is bad (`data/bad_rows.py`) unless the caller needs none (`need_answer=False`,
e.g. a learned reward model scores the completions). Prompts are tokenized with
`data.chat.encode_prompt`.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import parse_rows
from orchestrator.data.chat import check_messages
from orchestrator.data.sources import RawRow, load_rows


def _to_prompt(row: dict[str, Any], need_answer: bool = True) -> dict[str, Any]:
    if "question" in row and "answer" in row:
        prompt, answer = (
            row["question"],
            str(row["answer"]).split("####")[-1].strip().replace(",", ""),
        )
    elif "prompt" in row and ("answer" in row or "completion" in row):
        prompt, answer = (
            row["prompt"],
            str(row.get("answer", row.get("completion"))).strip(),
        )
    elif ("prompt" in row or "question" in row) and need_answer:
        raise ValueError(
            f"RL prompt row has no 'answer' (or 'completion') for the reward to check "
            f"(found keys: {', '.join(sorted(row))})"
        )
    elif "prompt" in row or "question" in row:
        prompt, answer = row["question"] if "question" in row else row["prompt"], None
    elif "chosen" in row and not need_answer:  # a preference row: its (implicit) prompt, for a learned reward
        from orchestrator.data.preference import to_pair

        prompt, answer = to_pair(row)[0], None
    else:
        raise ValueError(
            f"row needs 'prompt' and 'answer' (or 'question'/'answer') (found keys: {', '.join(sorted(row)) or 'none'})"
        )
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise ValueError("'prompt' must be a string or a list of messages")
    check_messages(msgs, "prompt")
    if answer is not None and not answer:
        raise ValueError("empty answer")
    return {"messages": msgs, "answer": answer}


def prompt_rows(rows: list[RawRow], d: DataConfig, need_answer: bool = True) -> list[dict[str, Any]]:
    """`{"messages", "answer"}` per usable row (answer None without one, if not needed)."""
    return parse_rows(rows, lambda row: _to_prompt(row, need_answer), d, "prompt rows")


def load_prompts(d: DataConfig, need_answer: bool = True) -> list[dict[str, Any]]:
    """`prompt_rows` of the rows of `d.source`."""
    return prompt_rows(load_rows(d), d, need_answer)
