"""Streaming: read, tokenize, shuffle and pack on the fly, with an exact resumable position.

For corpora larger than memory or disk (`data.streaming=true`). Each epoch visits the
source's shards in a seeded order (name order without `data.shuffle`); rows pass a seeded
shuffle buffer of `data.shuffle_buffer` examples (none without `data.shuffle`) and become
training rows as in the prepared path: `padded` one example per row, `packed` greedy
packing in stream order (`table.packed_row`), `text` (continued pretraining) one token
stream cut into `max_seq_len` rows (`text.chunk_row`). `global_batch` rows make a batch;
an epoch's last batch may be partial, as with `BatchSource`. With `data.shuffle=false`,
`batching=padded` and `group_by_length=false` the batches are those of the in-memory path.

The position saved with a checkpoint: the epoch, the reader's shard and offset, the
buffer's RNG state, and references (`data/shards.py`) of the examples in the buffer, in
the partial row and in rows not yet batched; a resumed run reads and tokenizes those few
examples again and continues with exactly the batch the uninterrupted run would have
drawn. Bad rows follow `data.on_bad_rows`: an error stops at the row (`file:row N`);
skipped rows may be at most `data.max_bad_rows_fraction` of the rows read (checked from
1,000 rows on). The examples in flight are stored as int32 arrays (4 bytes a token).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import ROW_WARNINGS, BadRows
from orchestrator.data.shards import Ref, Shards
from orchestrator.data.sources import BadRow
from orchestrator.data.table import packed_row
from orchestrator.data.text import chunk_row
from orchestrator.errors import DataError

MIN_ROWS_FOR_FRACTION = 1000
"""Rows read before the bad-row fraction is checked (a few bad rows at the start are noise)."""

Piece = list[int]
"""`[shard, pos, line, start, end]`: tokens start..end of the example at ref `[shard, pos, line]`."""


class StreamSource:
    """Global batches from a stream; `state_dict` / `load_state_dict` as `BatchSource`."""

    def __init__(
        self,
        d: DataConfig,
        parse: Callable[[dict[str, Any]], list[dict[str, Any]]],
        global_batch: int,
        mode: str,
        document_masking: bool = False,
    ):
        """`mode`: padded | packed | text; `parse`: a row kind's parser (`data/kinds.py`)."""
        self.d, self.parse, self.global_batch, self.mode = d, parse, global_batch, mode
        self.masking = document_masking
        self.shards = Shards(d)
        self.buffer_size = d.shuffle_buffer if d.shuffle else 0
        self.policy = BadRows.from_config(d)
        self.seen = self.bad = 0
        self._examples: dict[tuple[int, ...], dict[str, array]] = {}
        self._start_epoch(0)

    # --------------------------------------------------------------- position
    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.ended = epoch, False
        self.order = list(range(len(self.shards)))
        if self.d.shuffle:
            random.Random(f"{self.d.seed}-shards-{epoch}").shuffle(self.order)
        self.pos = [0, 0, 0, 0]
        """[index in `order`, offset, line before it, rows to skip there]."""
        self.rng = random.Random(f"{self.d.seed}-stream-{epoch}")
        self.buffer: list[Ref] = []
        self.pending: list[Piece] = []
        self.queue: list[list[Piece]] = []
        self._reader: Iterator[tuple[Ref, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "epoch": self.epoch,
            "ended": self.ended,
            "pos": list(self.pos),
            "rng": [version, list(internal), gauss],
            "buffer": [list(r) for r in self.buffer],
            "pending": [list(p) for p in self.pending],
            "queue": [[list(p) for p in row] for row in self.queue],
            "seen": self.seen,
            "bad": self.bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_epoch(int(state["epoch"]))
        self.ended, self.pos = bool(state["ended"]), list(state["pos"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer, self.pending, self.queue = state["buffer"], state["pending"], state["queue"]
        self.seen, self.bad = int(state["seen"]), int(state["bad"])
        refs = self.buffer + [p[:3] for p in self.pending] + [p[:3] for row in self.queue for p in row]
        self._examples = {}
        for key, value in self.shards.read(refs).items():
            self._examples[key] = self._tokenize(list(key), value, count=False)

    # ---------------------------------------------------------------- reading
    def _read_one(self) -> tuple[Ref, Any] | None:
        """The next raw row of this epoch, or None when every shard is read."""
        while self.pos[0] < len(self.order):
            if self._reader is None:
                k, offset, line, skip = self.pos
                self._reader = self.shards.rows(self.order[k], offset, line)
                for _ in range(skip):
                    next(self._reader, None)
            item = next(self._reader, None)
            if item is not None:
                ref = item[0]
                self.pos = [self.pos[0], ref[1], ref[2] - 1, 1]
                return item
            self.pos, self._reader = [self.pos[0] + 1, 0, 0, 0], None
        return None

    def _tokenize(self, ref: Ref, value: Any, count: bool = True) -> dict[str, array] | None:
        """The example of a raw row (int32 arrays), or None for a bad row (policy applied)."""
        self.seen += count
        try:
            if isinstance(value, BadRow):
                raise ValueError(value.reason)
            if not isinstance(value, dict):
                raise ValueError(f"expected an object, got {type(value).__name__}")  # noqa: TRY004
            ex = self.parse(value)[0]
        except ValueError as exc:
            self._bad_row(ref, str(exc))
            return None
        return {"input_ids": array("i", ex["input_ids"]), "labels": array("i", ex.get("labels", ex["input_ids"]))}

    def _bad_row(self, ref: Ref, reason: str) -> None:
        """`data.on_bad_rows` for one row; only the first few are kept (a stream is unbounded)."""
        self.bad += 1
        where = self.shards.where(ref)
        if self.d.on_bad_rows == "error" or self.bad <= ROW_WARNINGS:
            self.policy.report(where, reason)
        frac = self.bad / max(self.seen, 1)
        if self.seen >= MIN_ROWS_FOR_FRACTION and frac > self.d.max_bad_rows_fraction:
            first = self.policy.bad[0] if self.policy.bad else f"{where}: {reason}"
            raise DataError(
                f"{self.bad} of the first {self.seen} rows are malformed ({frac:.1%} > "
                f"data.max_bad_rows_fraction={self.d.max_bad_rows_fraction}); first: {first}"
            )

    # ---------------------------------------------------------------- rows
    def _advance(self) -> None:
        """Read one row into the buffer (emitting one from it), or drain at the epoch's end."""
        item = self._read_one()
        if item is None:
            if self.buffer:
                j = self.rng.randrange(len(self.buffer))
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                self._emit(self.buffer.pop())
            else:
                if self.pending:
                    self.queue.append(self.pending)
                self.pending, self.ended = [], True
            return
        ex = self._tokenize(*item)
        if ex is None:
            return
        ref = item[0]
        self._examples[tuple(ref)] = ex
        if len(self.buffer) < self.buffer_size:
            self.buffer.append(ref)
            return
        if self.buffer_size:
            j = self.rng.randrange(self.buffer_size)
            ref, self.buffer[j] = self.buffer[j], ref
        self._emit(ref)

    def _emit(self, ref: Ref) -> None:
        """Turn the example at `ref` into (part of) rows: padded, packed or text."""
        n = len(self._examples[tuple(ref)]["input_ids"])
        if self.mode == "padded":
            self.queue.append([[*ref, 0, n]])
            return
        used = sum(p[4] - p[3] for p in self.pending)
        if self.mode == "packed":
            if self.pending and used + n > self.d.max_seq_len:
                self.queue.append(self.pending)
                self.pending = []
            self.pending.append([*ref, 0, n])
            return
        self.pending.append([*ref, 0, n])
        used += n
        while used >= self.d.max_seq_len:
            row, room = [], self.d.max_seq_len
            while room:
                p = self.pending[0]
                take = min(room, p[4] - p[3])
                row.append([*p[:3], p[3], p[3] + take])
                room -= take
                if p[3] + take == p[4]:
                    self.pending.pop(0)
                else:
                    p[3] += take
            self.queue.append(row)
            used -= self.d.max_seq_len

    def _row(self, pieces: list[Piece]) -> dict[str, list[int]]:
        exs = [self._examples[tuple(p[:3])] for p in pieces]
        if self.mode == "text":
            return chunk_row([list(e["input_ids"][p[3] : p[4]]) for e, p in zip(exs, pieces)], self.masking)
        rows = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in exs]
        if self.mode == "packed":
            return packed_row(rows)
        return dict(rows[0], position_ids=list(range(len(rows[0]["input_ids"]))))

    def next(self) -> list[dict[str, list[int]]]:
        """The next global batch (the last of an epoch may be partial)."""
        if self.ended and not self.queue:
            self._start_epoch(self.epoch + 1)
        while len(self.queue) < self.global_batch and not self.ended:
            self._advance()
        if not self.queue:
            raise DataError(f"data.source={self.d.source!r}: no usable rows in a whole pass over the stream")
        batch, self.queue = self.queue[: self.global_batch], self.queue[self.global_batch :]
        rows = [self._row(pieces) for pieces in batch]
        while not self.queue and not self.ended:  # so that `epoch` turns after an epoch's last batch
            self._advance()
        if self.ended and not self.queue:
            self._start_epoch(self.epoch + 1)
        live = {tuple(r) for r in self.buffer} | {tuple(p[:3]) for row in [self.pending, *self.queue] for p in row}
        for pieces in batch:
            for p in pieces:
                if tuple(p[:3]) not in live:
                    self._examples.pop(tuple(p[:3]), None)
        return rows
