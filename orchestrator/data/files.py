"""Source files: what a `data.source` names, their fingerprint, and raw rows as Arrow.

A source is one file, a directory (its `.jsonl`, `.json`, `.parquet` and `.txt` files, in
name order) or a glob (`/data/shards/*.parquet`). A `.txt` file is one document
(`{"text": <the file>}`); JSONL lines are rows; Parquet rows are rows. Each raw row keeps
where it came from (`file:row N`, N the 1-based line of a JSONL file, the row of a
Parquet file), so bad-row messages are those of the in-memory path (`data/sources.py`).

`write_raw` streams any of them (and generated rows) into one Arrow file in bounded
memory: JSON-like rows as their text (`__json`, parsed by the row's worker exactly as
`sources.py` parses it), Parquet rows as their columns; `__src` (file index) and
`__line` (row number) say where each came from.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
BATCH_ROWS = 10_000
"""Rows per Arrow record batch while writing raw rows (memory stays flat)."""
SAMPLE_BYTES = 1 << 20
"""Bytes hashed at each end of a file for its fingerprint (with its size and mtime)."""


def source_files(src: str) -> list[Path]:
    """The files a file / directory / glob source names; DataError when there are none."""
    path = Path(src).expanduser()
    if any(ch in src for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix in SUFFIXES)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    elif path.exists():
        if path.suffix not in SUFFIXES:
            raise DataError(
                f"data.source={src!r}: unsupported file type '{path.suffix}'. Use .jsonl, .parquet or .txt, "
                "a directory or glob of them, or `hf:<dataset id>`."
            )
        files = [path]
    else:
        files = []
    if not files:
        raise DataError(
            f"data.source={src!r}: file not found. Give a .jsonl, .parquet or .txt file (or a directory or "
            "glob of them), `hf:<dataset id>` or `synthetic:instruct`."
        )
    return files


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime and a hash of the first and last MiB: cheap, and changes with any edit."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if st.st_size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
            h.update(f.read())
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": h.hexdigest()}


def json_lines(path: Path, limit: int = 0) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line, as `sources._load_jsonl` reads them."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield i, line
            n += 1
            if limit and n >= limit:
                return


def _json_batches(files: list[Path], rows: Iterator[dict[str, Any]] | None, limit: int) -> Iterator[Any]:
    """Record batches (`__src`, `__line`, `__json`) of JSONL / text files or generated rows."""
    import pyarrow as pa

    def lines() -> Iterator[tuple[int, int, str]]:
        if rows is not None:
            yield from ((0, i, json.dumps(r)) for i, r in enumerate(rows, start=1))
            return
        left = limit
        for k, f in enumerate(files):
            if f.suffix == ".txt":
                yield k, 1, json.dumps({"text": f.read_text(encoding="utf-8")})
                left -= 1
            else:
                for i, line in json_lines(f, left if limit else 0):
                    yield k, i, line
                    left -= 1
            if limit and left <= 0:
                return

    buf: list[tuple[int, int, str]] = []
    for item in lines():
        buf.append(item)
        if len(buf) >= BATCH_ROWS:
            yield pa.record_batch([pa.array(c) for c in zip(*buf)], names=["__src", "__line", "__json"])
            buf = []
    if buf:
        yield pa.record_batch([pa.array(c) for c in zip(*buf)], names=["__src", "__line", "__json"])


def _parquet_batches(files: list[Path], limit: int) -> Iterator[Any]:
    """Record batches of Parquet files with `__src` and `__line` columns added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen = 0
    for k, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise DataError(f"data.source={str(f)!r}: cannot read Parquet file: {exc}") from exc
        line = 0
        for b in pf.iter_batches(batch_size=BATCH_ROWS):
            if limit:
                b = b.slice(0, limit - seen)
            n = b.num_rows
            b = b.append_column("__src", pa.array([k] * n, pa.int64()))
            yield b.append_column("__line", pa.array(range(line + 1, line + n + 1), pa.int64()))
            line, seen = line + n, seen + n
            if limit and seen >= limit:
                return


def write_raw(out: Path, files: list[Path], rows: Iterator[dict[str, Any]] | None = None, limit: int = 0) -> int:
    """Write the raw rows of `files` (or generated `rows`) to an Arrow file; the row count."""
    import pyarrow as pa

    parquet = rows is None and all(f.suffix == ".parquet" for f in files)
    if rows is None and not parquet and any(f.suffix == ".parquet" for f in files):
        raise DataError("data.source mixes Parquet with other file types; give one kind per source")
    batches = _parquet_batches(files, limit) if parquet else _json_batches(files, rows, limit)
    n, writer, schema = 0, None, None
    try:
        for b in batches:
            if writer is None:
                schema = b.schema
                writer = pa.ipc.new_stream(str(out), schema)
            elif b.schema != schema:
                where = files[b.column("__src")[0].as_py()]
                raise DataError(f"data.source: the columns of {where} differ from those of {files[0]}")
            writer.write_batch(b)
            n += b.num_rows
    finally:
        if writer is not None:
            writer.close()
    return n
