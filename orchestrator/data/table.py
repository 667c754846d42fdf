"""Prepared examples read by index, and the row views batching takes from them.

A `TokenTable` is a memory-mapped `datasets.Dataset` of tokenized examples (written by
`data/prepare.py`): the driver holds only per-example lengths and, when some rows were
bad, the indices of the good ones; a batch reads its rows from the mapped files. A
`MixedTable` is a weighted mixture of several tables (index arrays, no copies).

Row views turn examples into training rows without materializing them:

* `PackedRows`: the packing of `batching.pack` (the same seeded order and greedy
  boundaries, computed from lengths alone), each row assembled when it is read.
* `PaddedRows`: one example per row.

`pack_plan` and `packed_row` are the one implementation of packing; `batching.pack`
applies them to in-memory lists, so both paths give the same rows token for token.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from orchestrator.data.chat import IGNORE

Row = dict[str, list[int]]
PRIVATE = ("_bad", "_where")
"""Columns of a prepared file that are bookkeeping, not example fields."""


def pack_plan(lengths: Sequence[int], max_len: int, seed: int) -> tuple[array, array]:
    """(order, starts): examples in a seeded order (`random.Random(seed).shuffle`), and where
    each packed row starts in it (a row takes examples while they fit in `max_len`), with
    `len(order)` appended as the end of the last row."""
    order = array("q", range(len(lengths)))
    random.Random(seed).shuffle(order)
    starts, cur = array("q"), 0
    for k, i in enumerate(order):
        n = int(lengths[i])
        if k == 0 or (cur and cur + n > max_len):
            starts.append(k)
            cur = 0
        cur += n
    starts.append(len(order))
    return order, starts


def packed_row(examples: Sequence[Row]) -> Row:
    """Concatenate examples into one row; position ids restart at 0 for each example."""
    row: Row = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        row["input_ids"] += ex["input_ids"]
        # The first token of each example is never a target for the previous example's last
        # token: the shift in the loss would otherwise train across the boundary.
        row["labels"] += [IGNORE] + list(ex["labels"][1:])
        row["position_ids"] += list(range(n))
    return row


class TokenTable:
    """Prepared examples of one source, memory-mapped; `gather` reads rows by index."""

    def __init__(self, ds: Any, kept: np.ndarray | None = None):
        """`ds`: a `datasets.Dataset` with the example columns (and `PRIVATE` ones);
        `kept`: indices of the good rows (None: all)."""
        self.ds = ds.select_columns([c for c in ds.column_names if c not in PRIVATE])
        self.kept = kept
        self._lengths: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ds) if self.kept is None else len(self.kept)

    def lengths(self, column: str = "input_ids") -> np.ndarray:
        """Length of a list column per example (read from the Arrow offsets only)."""
        if column not in self._lengths:
            import pyarrow.compute as pc

            lens = pc.list_value_length(self.ds.data.column(column)).to_numpy(zero_copy_only=False)
            self._lengths[column] = lens if self.kept is None else lens[self.kept]
        return self._lengths[column]

    def values(self, column: str) -> np.ndarray:
        """A scalar column (e.g. a `bool` one) of every example, as an array."""
        vals = self.ds.data.column(column).to_numpy(zero_copy_only=False)
        return vals if self.kept is None else vals[self.kept]

    def gather(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The examples at `indices`, in that order."""
        if not len(indices):
            return []
        idx = [int(i) for i in indices] if self.kept is None else [int(self.kept[i]) for i in indices]
        cols = self.ds[idx]
        return [{c: cols[c][k] for c in cols} for k in range(len(idx))]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.gather([i])[0]


class MixedTable:
    """A weighted mixture: example i is `parts[part[i]]`'s example `index[i]`."""

    def __init__(self, parts: Sequence[Any], part: np.ndarray, index: np.ndarray):
        self.parts, self.part, self.index = list(parts), part, index

    @classmethod
    def sample(cls, parts: Sequence[Any], weights: Sequence[float], seed: int) -> MixedTable:
        """As many examples as the parts have together, `w / sum(w)` of them from each part:
        a seeded permutation of that part, repeated when its share exceeds its size."""
        total, wsum = sum(len(p) for p in parts), float(sum(weights))
        part_ids, rows = [], []
        for k, (p, w) in enumerate(zip(parts, weights)):
            take = round(total * w / wsum)
            perm = np.random.default_rng([seed, k]).permutation(len(p))
            rows.append(np.resize(perm, take) if len(p) else np.zeros(0, dtype=np.int64))
            part_ids.append(np.full(len(rows[-1]), k, dtype=np.int32))
        return cls(parts, np.concatenate(part_ids), np.concatenate(rows).astype(np.int64))

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self, column: str = "input_ids") -> np.ndarray:
        out = np.zeros(len(self), dtype=np.int64)
        for k, p in enumerate(self.parts):
            sel = self.part == k
            out[sel] = p.lengths(column)[self.index[sel]]
        return out

    def values(self, column: str) -> np.ndarray:
        out = np.zeros(len(self), dtype=object)
        for k, p in enumerate(self.parts):
            sel = self.part == k
            out[sel] = p.values(column)[self.index[sel]]
        return out

    def gather(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        out: list[Any] = [None] * len(indices)
        for k, p in enumerate(self.parts):
            pos = [j for j, i in enumerate(indices) if self.part[i] == k]
            for j, ex in zip(pos, p.gather([self.index[indices[j]] for j in pos])):
                out[j] = ex
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.gather([i])[0]


class ListTable:
    """An in-memory list of examples with the table interface (for mixtures and text chunks)."""

    def __init__(self, items: Sequence[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self, column: str = "input_ids") -> np.ndarray:
        return np.array([len(ex[column]) for ex in self.items], dtype=np.int64)

    def values(self, column: str) -> np.ndarray:
        return np.array([ex[column] for ex in self.items])

    def gather(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.items[int(i)] for i in indices]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def as_table(examples: Any) -> Any:
    """`examples` with the table interface: an in-memory list as a `ListTable`."""
    return ListTable(examples) if isinstance(examples, list) else examples


class RowView:
    """Training rows over a table, assembled when read; `lengths` per row."""

    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, r: int) -> Row:
        """Row `r`, assembled from the table."""
        raise NotImplementedError

    def __getitem__(self, r: int | slice) -> Any:
        """Row `r`, or a list of the rows of a slice (as a list of rows would give)."""
        if isinstance(r, slice):
            return [self.row(k) for k in range(*r.indices(len(self)))]
        return self.row(r)

    def __iter__(self) -> Iterator[Row]:
        return (self.row(r) for r in range(len(self)))


class PackedRows(RowView):
    """`batching.pack` over a table: same order, same boundaries, rows built on read."""

    def __init__(self, table: Any, max_len: int, seed: int):
        self.table = table
        ex_lengths = table.lengths()
        self.order, self.starts = pack_plan(ex_lengths, max_len, seed) if len(table) else (array("q"), array("q"))
        cum = np.concatenate([[0], np.cumsum(ex_lengths[np.frombuffer(self.order, dtype=np.int64)])])
        bounds = np.frombuffer(self.starts, dtype=np.int64)
        self.lengths = cum[bounds[1:]] - cum[bounds[:-1]] if len(bounds) > 1 else np.zeros(0, dtype=np.int64)

    def row(self, r: int) -> Row:
        return packed_row(self.table.gather(self.order[self.starts[r] : self.starts[r + 1]]))


class PaddedRows(RowView):
    """One example per row, with its position ids."""

    def __init__(self, table: Any):
        self.table = table
        self.lengths = table.lengths()

    def row(self, r: int) -> Row:
        ex = self.table[r]
        return dict(ex, position_ids=list(range(len(ex["input_ids"]))))


def row_view(examples: Any, batching: str, max_len: int, seed: int) -> Any:
    """Training rows of `examples`: a list for an in-memory list (as before prepared data),
    a lazy view for a prepared table, or `examples` itself when it is a view already."""
    if isinstance(examples, RowView):
        return examples
    if isinstance(examples, (TokenTable, MixedTable)):
        return PackedRows(examples, max_len, seed) if batching == "packed" else PaddedRows(examples)
    if batching == "packed":
        order, starts = pack_plan([len(ex["input_ids"]) for ex in examples], max_len, seed)
        return [packed_row([examples[i] for i in order[starts[r] : starts[r + 1]]]) for r in range(len(starts) - 1)]
    return [dict(ex, position_ids=list(range(len(ex["input_ids"])))) for ex in examples]


def row_lengths(rows: Any) -> Sequence[int]:
    """Token count per row of a view or a list."""
    return rows.lengths if isinstance(rows, RowView) else [len(r["input_ids"]) for r in rows]
