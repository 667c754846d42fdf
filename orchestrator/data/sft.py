"""Turn chat or prompt/completion rows into token ids with a completion-only loss mask.

Rows are either `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`
(strings, or message lists as in TRL's conversational format). The chat encoder
(`data/chat.py`) renders them and finds the assistant turns; labels are IGNORE (-100)
everywhere except on those turns (or everywhere real with `train_on_prompt`). Bad rows
(including an empty assistant message or completion) go through `data/bad_rows.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import parse_rows
from orchestrator.data.chat import (
    IGNORE,
    ROLES,
    as_messages,
    assistant_labels,
    assistant_prefixes,
    check_messages,
    encode_labeled_many,
    render,
    render_text,
    require_chat_template,
    tokenize_texts,
)
from orchestrator.data.sources import RawRow

__all__ = ["IGNORE", "ROLES", "SftTokenizer", "to_messages", "tokenize_rows"]


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The conversation of an SFT row (`fmt`: auto | messages | prompt_completion)."""
    if fmt in ("auto", "messages") and "messages" in row:
        msgs = check_messages(row["messages"])
    elif fmt in ("auto", "prompt_completion") and "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        if not isinstance(p, (str, list)) or not isinstance(c, (str, list)):
            raise ValueError("'prompt' and 'completion' must be strings or lists of messages")
        msgs = check_messages(as_messages(p, "prompt", "user") + as_messages(c, "completion", "assistant"))
    else:
        want = {
            "auto": "'messages', or 'prompt' and 'completion'",
            "messages": "'messages'",
            "prompt_completion": "'prompt' and 'completion'",
        }[fmt]
        raise ValueError(f"row needs {want} (found keys: {', '.join(sorted(row)) or 'none'})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant message: nothing to train on")
    return msgs


class SftTokenizer:
    """Messages -> `{"input_ids", "labels"}`, truncated to `max_seq_len`."""

    def __init__(self, tokenizer: Any, max_seq_len: int, truncate: bool, train_on_prompt: bool):
        require_chat_template(tokenizer)
        self.tok = tokenizer
        self.max_len = max_seq_len
        self.truncate = truncate
        self.train_on_prompt = train_on_prompt

    def _ids(self, msgs: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return render(self.tok, msgs, add_generation_prompt)

    def __call__(self, msgs: Sequence[dict[str, str]]) -> dict[str, list[int]]:
        ids = self._ids(msgs, False)
        labels = list(ids) if self.train_on_prompt else assistant_labels(self.tok, msgs, ids)
        return self._example(ids, labels)

    def encode_many(self, convs: Sequence[Sequence[dict[str, str]] | ValueError]) -> list[dict[str, Any] | ValueError]:
        """`self(msgs)` of each conversation (a bad row -> its ValueError, in its place), with
        the conversations of the batch tokenized in one batched call and their assistant
        turns located in their own tokens (`chat.encode_labeled_many`): the same examples,
        without one tokenizer call per render (a row with k assistant turns renders up to
        2k + 1 texts to locate them)."""
        out: list[Any] = list(convs)
        rendered: list[tuple[Any, str, list[str]]] = []
        where: list[int] = []
        for k, msgs in enumerate(convs):
            if isinstance(msgs, ValueError):
                continue
            try:  # a template may reject a row (as `render` would)
                text = render_text(self.tok, msgs, False)
                # the last prefix of a conversation that ends with its assistant turn is the
                # conversation itself: its text is not rendered twice
                prefixes = [
                    text if len(m) == len(msgs) and not g else render_text(self.tok, m, g)
                    for m, g in ([] if self.train_on_prompt else assistant_prefixes(msgs))
                ]
            except ValueError as exc:
                out[k] = exc
                continue
            rendered.append((msgs, text, prefixes))
            where.append(k)
        if self.train_on_prompt:
            encoded = [(ids, list(ids)) for ids in tokenize_texts(self.tok, [text for _, text, _ in rendered])]
        else:
            encoded = encode_labeled_many(self.tok, rendered)
        for k, (ids, labels) in zip(where, encoded):
            try:
                out[k] = self._example(ids, labels)
            except ValueError as exc:
                out[k] = exc
        return out

    def _example(self, ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        """Truncate (or reject) an encoded conversation; reject one with nothing to train on."""
        if len(ids) > self.max_len:
            if not self.truncate:
                raise ValueError(
                    f"{len(ids)} tokens exceed data.max_seq_len={self.max_len} (set data.truncate=true to cut them)"
                )
            ids, labels = ids[: self.max_len], labels[: self.max_len]
        rest = labels[1:]
        if rest.count(IGNORE) == len(rest):  # all IGNORE (`count` runs in C: rows are long)
            raise ValueError(
                f"the prompt fills data.max_seq_len={self.max_len} tokens, leaving no "
                "completion tokens to train on (raise data.max_seq_len or shorten it)"
            )
        return {"input_ids": ids, "labels": labels}


def tokenize_rows(
    rows: list[RawRow], tokenizer: Any, d: DataConfig, train_on_prompt: bool
) -> list[dict[str, list[int]]]:
    """Tokenize every row; malformed rows fail the run, or are skipped up to a threshold."""
    if not rows:
        return parse_rows(rows, dict, d)  # raises: no rows
    enc = SftTokenizer(tokenizer, d.max_seq_len, d.truncate, train_on_prompt)
    return parse_rows(rows, lambda row: enc(to_messages(row, d.format)), d)
