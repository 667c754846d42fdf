"""Raw text for continued pretraining: documents -> token ids -> fixed-length rows.

A row of a text source is `{"text": ...}` (`stage.text_field`), a `.txt` file (one
document), a Parquet or `hf:` row with that field. Each document is tokenized with the
tokenizer's own special tokens (a BOS where the model uses one) and ends with EOS.

`TextChunks` joins the documents (in a seeded order) into one token stream and cuts it
into rows of exactly `max_seq_len` tokens (the last one shorter); a document may run
over into the next row. Every token is a target. With `document_masking`, position ids
restart at 0 where a document (or the part of it that runs over) starts, which
`transformers` turns into a block-diagonal causal mask, as for packed SFT rows, and the
first token of each such part is not a target (it has no context inside its document).
Without it, rows are plain concatenations (position ids 0..L-1).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

from orchestrator.data.chat import IGNORE
from orchestrator.data.table import RowView

Row = dict[str, list[int]]


class DocTokenizer:
    """A text row -> `{"input_ids"}`: the document's tokens and EOS."""

    def __init__(self, tokenizer: Any, text_field: str):
        self.tok, self.field = tokenizer, text_field
        self.eos = tokenizer.eos_token_id

    def __call__(self, row: dict[str, Any]) -> dict[str, list[int]]:
        if self.field not in row:
            raise ValueError(f"row needs '{self.field}' (found keys: {', '.join(sorted(row)) or 'none'})")
        text = row[self.field]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"'{self.field}' must be a non-empty string")
        ids = list(self.tok(text)["input_ids"])
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return {"input_ids": ids}


def chunk_row(pieces: list[list[int]], document_masking: bool) -> Row:
    """One row from consecutive document pieces (each the part of a document in this row)."""
    ids = [t for p in pieces for t in p]
    if not document_masking:
        return {"input_ids": ids, "labels": list(ids), "position_ids": list(range(len(ids)))}
    labels, pos = [], []
    for p in pieces:
        labels += [IGNORE] + p[1:]
        pos += range(len(p))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class TextChunks(RowView):
    """Documents of a table joined in a seeded order and cut into `max_len`-token rows."""

    def __init__(self, table: Any, max_len: int, seed: int, document_masking: bool):
        self.table, self.max_len, self.masking = table, max_len, document_masking
        self.order = array("q", range(len(table)))
        random.Random(seed).shuffle(self.order)
        doc_len = table.lengths()[np.frombuffer(self.order, dtype=np.int64)]
        self.ends = np.cumsum(doc_len)
        """Token offset where each document (in `order`) ends in the stream."""
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.lengths = np.minimum(max_len, total - np.arange(0, total, max_len))

    def row(self, r: int) -> Row:
        lo, hi = r * self.max_len, r * self.max_len + int(self.lengths[r])
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.ends, hi - 1, side="right"))
        docs = self.table.gather(self.order[first : last + 1])
        pieces = []
        for k, doc in enumerate(docs):
            start = int(self.ends[first + k]) - len(doc["input_ids"])
            pieces.append(doc["input_ids"][max(lo, start) - start : min(hi, start + len(doc["input_ids"])) - start])
        return chunk_row(pieces, self.masking)


_ANIMALS = ["fox", "owl", "cat", "bear", "otter", "heron", "wolf", "hare"]
_PLACES = ["forest", "river", "valley", "garden", "harbor", "meadow", "canyon", "island"]
_COLORS = ["red", "grey", "brown", "white", "black", "golden"]
_FOODS = ["berries", "fish", "seeds", "apples", "roots", "honey"]


def documents(n: int, seed: int) -> Iterator[dict[str, str]]:
    """`synthetic:text`: `n` short generated stories (`{"text"}`), a few sentences each, in a
    small regular language a tiny model learns quickly (continued-pretraining tests)."""
    rng = random.Random(seed)
    for _ in range(n):
        animal, place = rng.choice(_ANIMALS), rng.choice(_PLACES)
        lines = [f"The {rng.choice(_COLORS)} {animal} lives by the {place}."]
        for _ in range(rng.randint(2, 6)):
            food, days = rng.choice(_FOODS), rng.randint(2, 9)
            lines.append(f"Every {days} days the {animal} eats {food} near the {rng.choice(_PLACES)}.")
        lines.append(f"At night the {animal} sleeps by the {place}.")
        yield {"text": " ".join(lines)}
