"""A stage's examples: prepared (cached, memory-mapped), mixed, or in memory; and the CLI.

    python -m orchestrator.data.prepare +experiment=sft_lora data.source=/data/chat.jsonl

prepares a run's data ahead of it, in `data.num_proc` processes with a progress bar, and
prints where it is and what it holds; the run (any later start, a requeue, a resume, the
next stage of a chain with the same data settings) then reads it from the cache
(`data/cache.py`).

`load_examples(d, kind, options, tokenizer)` is what a stage calls: the examples of the row
kind it declares (`Stage.data_kind(cfg)`, see `data/kinds.py`) as a `TokenTable`
(prepared, `data.cache=true`), a `MixedTable` (`data.source=mixture`), or a list
(`data.cache=false`: tokenized in memory, as before prepared data existed). Batching
reads all three the same way (`data/table.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import parse_rows
from orchestrator.data.cache import cache_root, prepare_source
from orchestrator.data.kinds import KINDS
from orchestrator.data.sources import load_rows
from orchestrator.data.table import ListTable, MixedTable
from orchestrator.errors import ConfigError

log = logging.getLogger("orchestrator")


def stage_kind(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(row kind, its options) the configured stage reads: its `data_kind(cfg)`."""
    from orchestrator.stages import STAGES

    data_kind = getattr(STAGES.get(cfg.stage.name), "data_kind", None)
    if data_kind is None:
        raise ConfigError(f"stage={cfg.stage.name} does not read prepared data")
    return data_kind(cfg)


def in_memory(d: DataConfig, kind_name: str, opts: dict[str, Any], tok: Any) -> list[dict[str, Any]]:
    """Examples tokenized in this process, held in a list (`data.cache=false`)."""
    kind = KINDS[kind_name]
    rows = load_rows(d)
    if not rows:
        return parse_rows(rows, dict, d)  # raises: no rows
    parse = kind.build(tok, d, opts)
    return [ex for exs in parse_rows(rows, parse, d, kind.what) for ex in exs]


def source_configs(d: DataConfig) -> list[tuple[DataConfig, float]]:
    """One data config per source of a mixture (with its weight); `[(d, 1.0)]` otherwise."""
    if d.source != "mixture":
        return [(d, 1.0)]
    return [
        (
            replace(
                d,
                source=s.source,
                format=s.format or d.format,
                split=s.split,
                num_samples=s.num_samples,
                sources=[],
            ),
            s.weight,
        )
        for s in d.sources
    ]


def load_examples(d: DataConfig, kind_name: str, opts: dict[str, Any], tok: Any) -> Any:
    """The examples of `d` as the stage's row kind (see the module docstring)."""
    parts = []
    for part, weight in source_configs(d):
        if d.cache:
            parts.append((prepare_source(part, kind_name, opts, tok), weight))
        else:
            parts.append((ListTable(in_memory(part, kind_name, opts, tok)), weight))
    if d.source == "mixture":
        mixed = MixedTable.sample([t for t, _ in parts], [w for _, w in parts], d.seed)
        log.info(
            "data: mixture of %s -> %d examples",
            ", ".join(f"{p.source} ({len(t)} x {w:g})" for (p, w), (t, _) in zip(source_configs(d), parts)),
            len(mixed),
        )
        return mixed
    table = parts[0][0]
    return table.items if isinstance(table, ListTable) else table


def main(argv: list[str] | None = None) -> int:
    """Compose the run's config from `argv` (overrides) and prepare its data."""
    from orchestrator.__main__ import setup_logging
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate
    from orchestrator.errors import OrchestratorError
    from orchestrator.models import build_tokenizer

    setup_logging(None)
    try:
        cfg, _ = compose(list(sys.argv[1:] if argv is None else argv))
        validate(cfg)
        kind, opts = stage_kind(cfg)
        d = replace(cfg.data, cache=True)
        t = time.time()
        examples = load_examples(d, kind, opts, build_tokenizer(cfg.model))
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prepared {len(examples)} {kind} examples of {d.source} in {time.time() - t:.1f}s under {cache_root(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
