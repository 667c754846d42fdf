"""The one bad-row policy, shared by every row kind (SFT, preference, RL prompts).

A row is bad when it cannot be parsed or does not have the shape its stage needs; the
row parser says why by raising `ValueError(reason)`. With `data.on_bad_rows=error` the
first bad row fails the run; with `skip` it is dropped with a warning, and the run
fails only when more than `data.max_bad_rows_fraction` of the rows are bad (a wrong
`data.format` or a wrong file should not train on the few rows that happen to parse).
Every message names the row the same way: `<file>:row <N>: <reason>`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from orchestrator.data.sources import RawRow, as_dict
from orchestrator.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

ROW_WARNINGS = 10
"""Skipped rows warned about one by one; the rest are counted in the summary."""


class BadRows:
    """Counts bad rows of one pass over a source and applies `data.on_bad_rows`."""

    def __init__(self, on_bad_rows: str, max_fraction: float, source: str = ""):
        self.on_bad_rows = on_bad_rows
        self.max_fraction = max_fraction
        self.source = source
        self.bad: list[str] = []

    @classmethod
    def from_config(cls, d: Any) -> BadRows:
        """From a `DataConfig` (anything with `on_bad_rows`, `max_bad_rows_fraction`, `source`)."""
        return cls(d.on_bad_rows, d.max_bad_rows_fraction, d.source)

    def report(self, where: str, reason: str) -> None:
        """Record one bad row: raise (error) or warn and count it (skip)."""
        msg = f"{where}: {reason}"
        if self.on_bad_rows == "error":
            raise DataError(
                f"{msg}. Fix the row, or set data.on_bad_rows=skip to skip up to data.max_bad_rows_fraction of rows."
            )
        if len(self.bad) < ROW_WARNINGS:
            log.warning("skipping bad row %s", msg)
        self.bad.append(msg)

    def parse(self, row: RawRow, fn: Callable[[dict[str, Any]], T]) -> T | None:
        """`fn(row as a dict)`, or None (after `report`) when the row is bad."""
        try:
            return fn(as_dict(row))
        except ValueError as exc:
            self.report(row.where, str(exc))
            return None

    def finish(self, total: int, kept: int, what: str = "rows") -> None:
        """After the pass: fail above the threshold or with nothing left; else summarize."""
        if self.bad:
            frac = len(self.bad) / max(total, 1)
            if frac > self.max_fraction:
                raise DataError(
                    f"{len(self.bad)} of {total} rows are malformed ({frac:.1%} > "
                    f"data.max_bad_rows_fraction={self.max_fraction}); first: {self.bad[0]}"
                )
            log.warning(
                "skipped %d malformed rows of %d (first: %s)",
                len(self.bad),
                total,
                self.bad[0],
            )
        if not kept:
            raise DataError(f"data.source={self.source!r}: no usable {what}")


def parse_rows(
    rows: Sequence[RawRow],
    fn: Callable[[dict[str, Any]], T],
    d: Any,
    what: str = "rows",
) -> list[T]:
    """Apply `fn` to every row under the bad-row policy of `d` (a `DataConfig`)."""
    if not rows:
        raise DataError(f"data.source={d.source!r} has no rows")
    policy = BadRows.from_config(d)
    out = [x for x in (policy.parse(row, fn) for row in rows) if x is not None]
    policy.finish(len(rows), len(out), what)
    return out
