"""Read raw rows from JSONL, Parquet, a Hugging Face dataset or a generator.

Each row comes with where it came from (`file:row N`), so a malformed row is reported
with its file, row number and reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.errors import DataError


@dataclass
class RawRow:
    where: str
    """`file.jsonl:row 17` (1-based) for error messages."""
    value: Any
    """The parsed row (a dict), or a BadRow for one that could not be parsed."""


@dataclass
class BadRow:
    reason: str


def load_rows(d: DataConfig) -> list[RawRow]:
    src = d.source
    if src.startswith("synthetic:"):
        from orchestrator.data.synthetic import GENERATORS, generate

        name = src.split(":", 1)[1]
        if name not in GENERATORS:
            raise DataError(
                f"data.source={src!r}: unknown generator. Available: " + ", ".join(f"synthetic:{g}" for g in GENERATORS)
            )
        rows = generate(name, d.num_samples or 1000, d.seed)
        return [RawRow(f"{src}:row {i + 1}", r) for i, r in enumerate(rows)]
    if src.startswith("hf:"):
        return _load_hf(src[3:], d)
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source={src!r}: file not found. Give a .jsonl or .parquet file, "
            "`hf:<dataset id>` or `synthetic:instruct`."
        )
    if path.suffix in (".jsonl", ".json"):
        rows = _load_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _load_parquet(path)
    else:
        raise DataError(
            f"data.source={src!r}: unsupported file type '{path.suffix}'. Use .jsonl or .parquet, or `hf:<dataset id>`."
        )
    return rows[: d.num_samples] if d.num_samples else rows


def _load_jsonl(path: Path) -> list[RawRow]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:row {i}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                value = BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
            rows.append(RawRow(where, value))
    return rows


def _load_parquet(path: Path) -> list[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"data.source={str(path)!r}: cannot read Parquet file: {exc}") from exc
    return [RawRow(f"{path}:row {i + 1}", r) for i, r in enumerate(table.to_pylist())]


def _load_hf(name: str, d: DataConfig) -> list[RawRow]:
    ds = hf_dataset(name, d)
    return [RawRow(f"hf:{name}[{d.split}]:row {i + 1}", r) for i, r in enumerate(ds)]


def hf_dataset(name: str, d: DataConfig, streaming: bool = False) -> Any:
    """`datasets.load_dataset(name, split=d.split)` (its first `d.num_samples` rows), or a
    DataError that says how to work without the Hub."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=d.split, streaming=streaming)
    # network, missing dataset, bad split: all end the same way
    except Exception as exc:
        raise DataError(
            f"data.source='hf:{name}' (split {d.split!r}) could not be loaded: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Without access to the "
            "Hugging Face Hub, export it to JSONL/Parquet on a machine that has access and set "
            "data.source to that file."
        ) from exc
    if d.num_samples:
        ds = ds.take(d.num_samples) if streaming else ds.select(range(min(d.num_samples, len(ds))))
    return ds


def as_dict(row: RawRow) -> dict[str, Any]:
    """The row as a dict; `ValueError(reason)` (a bad row, see `bad_rows.py`) otherwise."""
    # ValueError, not TypeError: it is a bad input row, which the bad-row policy handles.
    if isinstance(row.value, BadRow):
        raise ValueError(row.value.reason)  # noqa: TRY004
    if not isinstance(row.value, dict):
        raise ValueError(f"expected an object, got {type(row.value).__name__}")  # noqa: TRY004
    return row.value
