"""Row kinds: how one raw row of a stage's data becomes prepared examples.

A kind names the parser (a raw row dict -> examples, `ValueError(reason)` for a bad row,
exactly the function the in-memory path applies), the columns it writes, the options
that change its output (part of the cache key) and the modules whose code does (their
source is hashed into the cache key, so a changed encoder never reuses stale data).

| kind | rows | examples |
|---|---|---|
| `sft` | chat / prompt-completion (`data/sft.py`) | `input_ids`, `labels` |
| `text` | raw text `{"text"}` (`data/text.py`, continued pretraining) | `input_ids` (a document + EOS) |
| `pairs` | preference pairs (`data/preference.py`) | `prompt_ids`, `chosen_ids`, `rejected_ids`, `truncated` |
| `kto` | unpaired rows or pairs (`data/unpaired.py`) | `prompt_ids`, `completion_ids`, `label`, `truncated` |
| `prompts` | RL prompts (`data/prompts.py`) | `messages` (JSON text), `answer` |

`truncated` says whether `data.max_prompt_len` / `data.max_seq_len` cut the example; the
stage logs their count (`preference.log_truncated`), on the prepared and in-memory paths alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.config.schema import DataConfig

Parser = Callable[[dict[str, Any]], list[dict[str, Any]]]
ManyParser = Callable[[list[Any]], list[Any]]
"""Raw rows (a dict, or the ValueError of a row that is not one) -> per row, its examples
or the ValueError that makes it a bad row."""


@dataclass(frozen=True)
class RowKind:
    name: str
    columns: dict[str, str]
    """Column -> Arrow type: `ids` (list of int32), `str`, `bool`."""
    modules: tuple[str, ...]
    """Modules (under orchestrator/data) whose code decides the examples."""
    what: str
    """What the rows are called in messages ("preference rows")."""
    build: Callable[[Any, DataConfig, dict[str, Any]], Parser]
    """(tokenizer, data config, options) -> the row parser."""
    build_many: Callable[[Any, DataConfig, dict[str, Any]], ManyParser] | None = None
    """The same parser over a batch of rows, when batching makes it faster (preparation
    uses it; its examples are those of `build`'s parser, row for row)."""

    def parser_many(self, tok: Any, d: DataConfig, opts: dict[str, Any]) -> ManyParser:
        """`build_many`'s parser, or `build`'s applied row by row."""
        if self.build_many is not None:
            return self.build_many(tok, d, opts)
        parse = self.build(tok, d, opts)

        def many(rows: list[Any]) -> list[Any]:
            out: list[Any] = []
            for row in rows:
                try:
                    out.append(row if isinstance(row, ValueError) else parse(row))
                except ValueError as exc:
                    out.append(exc)
            return out

        return many


def _sft(tok: Any, d: DataConfig, opts: dict[str, Any]) -> Parser:
    from orchestrator.data.sft import SftTokenizer, to_messages

    enc = SftTokenizer(tok, d.max_seq_len, d.truncate, opts["train_on_prompt"])
    return lambda row: [enc(to_messages(row, str(d.format)))]


def _sft_many(tok: Any, d: DataConfig, opts: dict[str, Any]) -> ManyParser:
    from orchestrator.data.sft import SftTokenizer, to_messages

    enc = SftTokenizer(tok, d.max_seq_len, d.truncate, opts["train_on_prompt"])
    fmt = str(d.format)

    def conversation(row: Any) -> Any:
        if isinstance(row, ValueError):
            return row
        try:
            return to_messages(row, fmt)
        except ValueError as exc:
            return exc

    def many(rows: list[Any]) -> list[Any]:
        return [ex if isinstance(ex, ValueError) else [ex] for ex in enc.encode_many([conversation(r) for r in rows])]

    return many


def _text(tok: Any, d: DataConfig, opts: dict[str, Any]) -> Parser:
    from orchestrator.data.text import DocTokenizer

    enc = DocTokenizer(tok, opts["text_field"])
    return lambda row: [enc(row)]


def _pairs(tok: Any, d: DataConfig, opts: dict[str, Any]) -> Parser:
    from orchestrator.data.preference import PairTokenizer, to_pair

    enc = PairTokenizer(tok, d.max_seq_len, d.truncate, d.max_prompt_len)

    def parse(row: dict[str, Any]) -> list[dict[str, Any]]:
        before = enc.truncated
        pair = enc(*to_pair(row))
        return [dict(pair, truncated=enc.truncated > before)]

    return parse


def _kto(tok: Any, d: DataConfig, opts: dict[str, Any]) -> Parser:
    from orchestrator.data.unpaired import ExampleTokenizer, to_examples

    enc = ExampleTokenizer(tok, d.max_seq_len, d.truncate, d.max_prompt_len)

    def one(ex: tuple[Any, Any, bool]) -> dict[str, Any]:
        before = enc.truncated
        out = enc(*ex)
        return dict(out, truncated=enc.truncated > before)

    return lambda row: [one(ex) for ex in to_examples(row)]


def _prompts(tok: Any, d: DataConfig, opts: dict[str, Any]) -> Parser:
    from orchestrator.data.prompts import _to_prompt

    def parse(row: dict[str, Any]) -> list[dict[str, Any]]:
        p = _to_prompt(row, opts["need_answer"])
        return [{"messages": json.dumps(p["messages"]), "answer": p["answer"]}]

    return parse


_CHAT = ("chat.py", "sources.py", "bad_rows.py")
KINDS: dict[str, RowKind] = {
    "sft": RowKind("sft", {"input_ids": "ids", "labels": "ids"}, (*_CHAT, "sft.py"), "rows", _sft, _sft_many),
    "text": RowKind("text", {"input_ids": "ids"}, ("text.py", "sources.py"), "documents", _text),
    "pairs": RowKind(
        "pairs",
        {"prompt_ids": "ids", "chosen_ids": "ids", "rejected_ids": "ids", "truncated": "bool"},
        (*_CHAT, "preference.py"),
        "preference rows",
        _pairs,
    ),
    "kto": RowKind(
        "kto",
        {"prompt_ids": "ids", "completion_ids": "ids", "label": "bool", "truncated": "bool"},
        (*_CHAT, "preference.py", "unpaired.py"),
        "KTO rows",
        _kto,
    ),
    "prompts": RowKind(
        "prompts", {"messages": "str", "answer": "str"}, (*_CHAT, "prompts.py"), "prompt rows", _prompts
    ),
}


def decode_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """A prepared `prompts` example back in the form `prompts.prompt_rows` gives."""
    return {"messages": json.loads(example["messages"]), "answer": example["answer"]}
