"""The prepared-data cache: one source -> tokenized examples in memory-mapped Arrow files.

Preparing one source: its raw rows are streamed into an Arrow file (`data/files.py`),
tokenized by `datasets.map` in `data.num_proc` processes with the row kind's parser
(`data/kinds.py`: the in-memory path's function, or a batched one that gives the same
examples, as SFT's, which tokenizes a batch in one call), and written as Arrow
shards, bad rows kept as a reason (`_bad`) and a place (`_where`). Loading memory-maps the
shards and applies `data.on_bad_rows` with the usual `file:row N: reason` messages, so a
changed bad-row setting needs no new preparation.

The cache key covers everything that decides the examples: the source (per file: path,
size, mtime and a hash of its first and last MiB; an `hf:` set's fingerprint, which
follows its revision; a generator's name, size, seed and code), the tokenizer (its
serialized vocabulary, normalizer and special tokens) and chat template, the data and
stage options that change tokenization (`max_seq_len`, `truncate`, `format`,
`train_on_prompt`, ...), the source code of the modules that tokenize, and the versions
of `transformers`, `tokenizers` and `datasets`. One directory per key under
`data.cache_dir`; it is written under a temporary name and renamed when complete, under a
file lock, so concurrent starts prepare once and a crash leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config.schema import DataConfig
from orchestrator.data.bad_rows import BadRows
from orchestrator.data.files import file_fingerprint, source_files, write_raw
from orchestrator.data.kinds import KINDS, RowKind
from orchestrator.data.table import TokenTable
from orchestrator.errors import DataError

log = logging.getLogger("orchestrator")

ROWS_PER_PROC = 10_000
"""A preparation uses at most one process per this many rows (smaller sets stay in one)."""
CODE = ("cache.py", "files.py", "kinds.py", "table.py")
"""Modules of this package whose code is in every cache key (with the row kind's own)."""
DATA_KEYS = ("format", "max_seq_len", "max_prompt_len", "truncate", "num_samples", "split")
"""Data options that change tokenized examples (the rest apply when batches are read)."""


def cache_root(d: DataConfig) -> Path:
    """`data.cache_dir`, or `$XDG_CACHE_HOME/orchestrator/data`."""
    if d.cache_dir:
        return Path(d.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchestrator" / "data"


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of everything in the tokenizer that decides token ids and chat rendering."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    h.update(body.encode())
    extra = {
        "class": type(tok).__name__,
        "chat_template": getattr(tok, "chat_template", None),
        "special": getattr(tok, "special_tokens_map", {}),
        "added": {str(k): str(v) for k, v in getattr(tok, "added_tokens_decoder", {}).items()},
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_fingerprint(modules: tuple[str, ...]) -> str:
    """A hash of the source of `modules` (file names under orchestrator/data)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode() + (here / name).read_bytes())
    return h.hexdigest()


def source_fingerprint(d: DataConfig) -> dict[str, Any]:
    """What identifies the content of `d.source` (see the module docstring)."""
    if d.source.startswith("synthetic:"):
        import inspect

        from orchestrator.data.synthetic import GENERATORS

        name = d.source.split(":", 1)[1]
        fn = GENERATORS.get(name)
        code = Path(inspect.getsourcefile(fn)).read_bytes() if fn else b""
        synth = Path(__file__).with_name("synthetic.py").read_bytes()
        code_hash = hashlib.sha256(code + synth).hexdigest()
        return {"generator": name, "rows": d.num_samples or 1000, "seed": d.seed, "code": code_hash}
    if d.source.startswith("hf:"):
        from orchestrator.data.sources import hf_dataset

        return {"hf": d.source[3:], "split": d.split, "fingerprint": hf_dataset(d.source[3:], d)._fingerprint}
    return {"files": [file_fingerprint(f) for f in source_files(d.source)]}


def cache_key(d: DataConfig, kind: RowKind, opts: dict[str, Any], tok: Any) -> tuple[str, dict[str, Any]]:
    """(key, what it covers) for preparing `d` as `kind` with `tok`."""
    import datasets
    import tokenizers
    import transformers

    parts = {
        "kind": kind.name,
        "options": opts,
        "data": {k: str(getattr(d, k)) for k in (DATA_KEYS if kind.name != "text" else ("num_samples", "split"))},
        "source": source_fingerprint(d),
        "tokenizer": tokenizer_fingerprint(tok),
        "code": code_fingerprint(CODE + kind.modules),
        "versions": [transformers.__version__, tokenizers.__version__, datasets.__version__],
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{kind.name}-{key}", parts


def _raw_dataset(d: DataConfig, tmp: Path) -> tuple[Any, list[str]]:
    """The raw rows of `d.source` as a `datasets.Dataset`, and the name of each `__src`."""
    import datasets

    if d.source.startswith("hf:"):
        from orchestrator.data.sources import hf_dataset

        return hf_dataset(d.source[3:], d), [f"{d.source}[{d.split}]"]
    if d.source.startswith("synthetic:"):
        from orchestrator.data.synthetic import GENERATORS, generate

        name = d.source.split(":", 1)[1]
        if name not in GENERATORS:
            raise DataError(
                f"data.source={d.source!r}: unknown generator. Available: "
                + ", ".join(f"synthetic:{g}" for g in GENERATORS)
            )
        n = write_raw(tmp / "raw.arrow", [], rows=iter(generate(name, d.num_samples or 1000, d.seed)))
        names = [d.source]
    else:
        files = source_files(d.source)
        n = write_raw(tmp / "raw.arrow", files, limit=d.num_samples)
        names = [str(f) for f in files]
    if not n:
        raise DataError(f"data.source={d.source!r} has no rows")
    return datasets.Dataset.from_file(str(tmp / "raw.arrow")), names


def _row_value(batch: dict[str, list[Any]], k: int) -> dict[str, Any]:
    """Row `k` of a raw batch as a dict; ValueError (a bad row) as `sources.as_dict` raises it."""
    if "__json" in batch:
        try:
            value = json.loads(batch["__json"][k])
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        return value
    return {c: v[k] for c, v in batch.items() if not c.startswith("__")}


def tokenize_batch(
    batch: dict[str, list[Any]], indices: list[int], parse_many: Any, names: list[str], columns: list[str]
) -> dict[str, list[Any]]:
    """`datasets.map` function: raw rows -> examples (a bad row -> one entry with its reason).
    `parse_many` (`RowKind.parser_many`) takes the whole batch, so a kind can tokenize it in
    one call."""
    rows: list[Any] = []
    for k in range(len(indices)):
        try:
            rows.append(_row_value(batch, k))
        except ValueError as exc:
            rows.append(exc)
    out: dict[str, list[Any]] = {c: [] for c in [*columns, "_bad", "_where"]}
    for k, (i, examples) in enumerate(zip(indices, parse_many(rows))):
        if isinstance(examples, ValueError):
            src = batch["__src"][k] if "__src" in batch else 0
            line = batch["__line"][k] if "__line" in batch else i + 1
            examples = [{**dict.fromkeys(columns), "_bad": str(examples), "_where": f"{names[src]}:row {line}"}]
        for ex in examples:
            for c in out:
                out[c].append(ex.get(c))
    return out


def _features(kind: RowKind) -> Any:
    from datasets import Features, List, Value

    types = {"ids": List(Value("int32")), "str": Value("string"), "bool": Value("bool")}
    return Features(
        {**{c: types[t] for c, t in kind.columns.items()}, "_bad": Value("string"), "_where": Value("string")}
    )


def _build(d: DataConfig, kind: RowKind, opts: dict[str, Any], tok: Any, tmp: Path) -> dict[str, Any]:
    """Prepare `d` into `tmp`: Arrow shards of examples; returns what meta.json records."""
    t = time.time()
    raw, names = _raw_dataset(d, tmp)
    procs = min(d.num_proc or os.cpu_count() or 1, max(1, len(raw) // ROWS_PER_PROC))
    ds = raw.map(
        tokenize_batch,
        with_indices=True,
        batched=True,
        fn_kwargs={"parse_many": kind.parser_many(tok, d, opts), "names": names, "columns": list(kind.columns)},
        remove_columns=raw.column_names,
        features=_features(kind),
        num_proc=procs if procs > 1 else None,
        cache_file_name=str(tmp / "examples.arrow"),
        new_fingerprint=tmp.name,
        load_from_cache_file=False,
        desc=f"Preparing {d.source} ({kind.name})",
    )
    meta = {"shards": [Path(f["filename"]).name for f in ds.cache_files], "rows": len(raw), "examples": len(ds)}
    del ds, raw
    (tmp / "raw.arrow").unlink(missing_ok=True)
    return {**meta, "procs": procs, "seconds": round(time.time() - t, 2)}


def _load(path: Path) -> tuple[Any, dict[str, Any]]:
    """The memory-mapped examples of a prepared directory, and its meta.json."""
    import datasets

    meta = json.loads((path / "meta.json").read_text())
    parts = [datasets.Dataset.from_file(str(path / s)) for s in meta["shards"]]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), meta


def apply_bad_rows(ds: Any, d: DataConfig, kind: RowKind, rows: int) -> np.ndarray | None:
    """Apply `data.on_bad_rows` to a prepared set (`rows` raw rows); the indices of the good
    examples, or None when all are good."""
    import pyarrow.compute as pc

    bad = pc.is_valid(ds.data.column("_bad")).to_numpy(zero_copy_only=False)
    policy = BadRows.from_config(d)
    if bad.any():
        idx = np.flatnonzero(bad)
        idx = idx[:1] if d.on_bad_rows == "error" else idx
        where = ds.data.column("_where").take(idx).to_pylist()
        for w, reason in zip(where, ds.data.column("_bad").take(idx).to_pylist()):
            policy.report(w, reason)
    policy.finish(rows, int(len(bad) - bad.sum()), kind.what)
    return np.flatnonzero(~bad) if bad.any() else None


def prepare_source(d: DataConfig, kind_name: str, opts: dict[str, Any], tok: Any) -> TokenTable:
    """The prepared examples of `d.source` (prepared now, or reused from the cache)."""
    from filelock import FileLock

    kind = KINDS[kind_name]
    if kind_name != "text":
        from orchestrator.data.chat import require_chat_template

        require_chat_template(tok)
    key, parts = cache_key(d, kind, opts, tok)
    root = cache_root(d)
    final = root / key
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{key}.lock")):
            if not (final / "meta.json").is_file():
                _prepare_into(d, kind, opts, tok, final, parts)
    else:
        log.info("data: reusing prepared %s (%s)", d.source, final)
    ds, meta = _load(final)
    return TokenTable(ds, apply_bad_rows(ds, d, kind, meta["rows"]))


def _prepare_into(d: DataConfig, kind: RowKind, opts: dict[str, Any], tok: Any, final: Path, parts: dict) -> None:
    """Build into a temporary directory beside `final`, then rename it into place."""
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = _build(d, kind, opts, tok, tmp)
        meta.update(key=final.name, covers=parts)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "data: prepared %s: %d rows -> %d examples in %.1fs (%d processes), %s",
        d.source,
        meta["rows"],
        meta["examples"],
        meta["seconds"],
        meta["procs"],
        final,
    )
