"""Prompt data for RL stages: rows with a prompt and a verifiable answer.

Accepted rows: `{"prompt": str | messages, "answer": str}`; GSM8K style
`{"question": str, "answer": "... #### 72"}` (the number after #### is the answer);
and SFT-style `{"prompt", "completion"}` (the completion is the answer).
"""

from __future__ import annotations

from typing import Any, Dict, List

from orchestrator.config.schema import DataConfig
from orchestrator.data.sources import RawRow, as_dict, load_rows
from orchestrator.errors import DataError


def _to_prompt(row: Dict[str, Any]) -> Dict[str, Any]:
    if "question" in row and "answer" in row:
        prompt, answer = row["question"], str(row["answer"]).split("####")[-1].strip().replace(",", "")
    elif "prompt" in row and ("answer" in row or "completion" in row):
        prompt, answer = row["prompt"], str(row.get("answer", row.get("completion"))).strip()
    else:
        raise ValueError(f"row needs 'prompt' and 'answer' (or 'question'/'answer') "
                         f"(found keys: {', '.join(sorted(row)) or 'none'})")
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise ValueError("'prompt' must be a string or a list of messages")
    if not answer:
        raise ValueError("empty answer")
    return {"messages": msgs, "answer": answer}


def prompt_rows(rows: List[RawRow], d: DataConfig) -> List[Dict[str, Any]]:
    out, bad = [], []
    for row in rows:
        try:
            out.append(_to_prompt(as_dict(row)))
        except ValueError as exc:
            if d.on_bad_rows == "error":
                raise DataError(f"{row.where}: {exc}. Fix the row, or set data.on_bad_rows=skip.") from exc
            bad.append(f"{row.where}: {exc}")
    if bad and len(bad) / max(len(rows), 1) > d.max_bad_rows_fraction:
        raise DataError(f"{len(bad)} of {len(rows)} rows are malformed; first: {bad[0]}")
    if not out:
        raise DataError(f"data.source={d.source!r}: no usable prompt rows")
    return out


def load_prompts(d: DataConfig) -> List[Dict[str, Any]]:
    return prompt_rows(load_rows(d), d)
