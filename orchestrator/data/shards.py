"""Raw rows of a streamed source, read in order from a position, or again by reference.

Streaming never holds a corpus: it reads one row after the other from a source's shards
(the files of `files.source_files`: JSONL, `.txt` documents, Parquet; or an `hf:` set in
streaming mode) and can read any row it handed out again from its reference alone, so
a checkpoint stores references, not data. A reference is `[shard, pos, line]`:

* JSONL: `pos` is the byte offset of the line, `line` its 1-based line number;
* `.txt`: the whole file, `[shard, 0, 1]`;
* Parquet and `hf:`: `pos` is the row index, `line = pos + 1`.

A row comes as `(ref, where, value)`, `value` a dict or a `BadRow` (unparseable JSON),
`where` the `file:row N` of bad-row messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.files import source_files
from orchestrator.data.sources import BadRow

Ref = list[int]


def _parse(line: str) -> Any:
    """A JSONL line as `sources._load_jsonl` parses it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")


class Shards:
    """The shards of one source; `rows` reads on from a position, `read` re-reads by reference."""

    def __init__(self, d: DataConfig):
        self.d = d
        if d.source.startswith("hf:"):
            self.files: list[Path] = []
            self.names = [f"{d.source}[{d.split}]"]
        else:
            self.files = source_files(d.source)
            self.names = [str(f) for f in self.files]

    def __len__(self) -> int:
        return len(self.names)

    def where(self, ref: Ref) -> str:
        return f"{self.names[ref[0]]}:row {ref[2]}"

    def rows(self, shard: int, pos: int, line: int) -> Iterator[tuple[Ref, Any]]:
        """(ref, value) of shard `shard` from position `pos` (the line number before it: `line`)."""
        if not self.files:
            yield from self._hf_rows(pos)
            return
        path = self.files[shard]
        if path.suffix == ".txt":
            if pos == 0:
                yield [shard, 0, 1], {"text": path.read_text(encoding="utf-8")}
        elif path.suffix == ".parquet":
            yield from self._parquet_rows(shard, pos)
        else:
            yield from self._jsonl_rows(shard, pos, line)

    def _jsonl_rows(self, shard: int, pos: int, line: int) -> Iterator[tuple[Ref, Any]]:
        with open(self.files[shard], "rb") as f:
            f.seek(pos)
            while True:
                start, raw = f.tell(), f.readline()
                if not raw:
                    return
                line += 1
                text = raw.decode("utf-8")
                if text.strip():
                    yield [shard, start, line], _parse(text)

    def _parquet_rows(self, shard: int, pos: int) -> Iterator[tuple[Ref, Any]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.files[shard])
        first = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n > pos:
                rows = pf.read_row_group(g).to_pylist()
                for i in range(max(pos - first, 0), n):
                    yield [shard, first + i, first + i + 1], rows[i]
            first += n

    def _hf_rows(self, pos: int) -> Iterator[tuple[Ref, Any]]:
        from orchestrator.data.sources import hf_dataset

        ds = hf_dataset(self.d.source[3:], self.d, streaming=True)
        for i, row in enumerate(ds.skip(pos) if pos else ds, start=pos):
            yield [0, i, i + 1], row

    def read(self, refs: Sequence[Ref]) -> dict[tuple[int, ...], Any]:
        """The values at `refs` (keyed by `tuple(ref)`)."""
        out: dict[tuple[int, ...], Any] = {}
        by_shard: dict[int, list[Ref]] = {}
        for r in refs:
            by_shard.setdefault(r[0], []).append(r)
        for shard, rs in by_shard.items():
            rs.sort(key=lambda r: r[1])
            if self.files and self.files[shard].suffix not in (".parquet", ".txt"):
                for r in rs:
                    out[tuple(r)] = next(self._jsonl_rows(shard, r[1], r[2] - 1))[1]
                continue
            want = {tuple(r) for r in rs}
            for ref, value in self.rows(shard, rs[0][1], rs[0][2] - 1):
                if tuple(ref) in want:
                    out[tuple(ref)] = value
                if ref[1] >= rs[-1][1]:
                    break
        return out
