"""Prepared data: the cache gives the in-memory path's examples and batches, is reused by a
second start, is invalidated by whatever changes the tokens, prepares in parallel, keeps
bad-row messages, and mixes weighted sources deterministically."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import orchestrator.data.cache as cache
from orchestrator.config.schema import DataConfig, ModelConfig, SourceSpec
from orchestrator.data.batching import BatchSource
from orchestrator.data.prepare import in_memory, load_examples
from orchestrator.data.sft import tokenize_rows
from orchestrator.data.sources import load_rows
from orchestrator.data.synthetic import generate
from orchestrator.data.table import MixedTable, TokenTable
from orchestrator.errors import DataError
from orchestrator.models import build_tokenizer

SFT = ("sft", {"train_on_prompt": False})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


@pytest.fixture
def builds(monkeypatch):
    """Counts preparations (cache misses)."""
    calls = []
    real = cache._build

    def counting(*args, **kwargs):
        calls.append(args[0].source)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "_build", counting)
    return calls


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(tmp_path, source, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_prepared_examples_and_batches_equal_the_in_memory_path(tok, tmp_path, builds):
    d = _cfg(tmp_path, "synthetic:instruct", num_samples=300, max_seq_len=128)
    table = load_examples(d, *SFT, tok)
    assert isinstance(table, TokenTable) and builds == ["synthetic:instruct"]
    mem = tokenize_rows(load_rows(d), tok, d, False)  # the path before prepared data
    assert table.gather(range(len(table))) == mem
    for batching in ("packed", "padded"):
        a = BatchSource(mem, batching, 128, 8, seed=1, shuffle=True, group_by_length=True)
        b = BatchSource(table, batching, 128, 8, seed=1, shuffle=True, group_by_length=True)
        assert len(a.rows) == len(b.rows)
        assert b.rows[3:11] == a.rows[3:11] and b.rows[-2:] == a.rows[-2:]  # rows slice like a list
        for _ in range(2 * a.batches_per_epoch + 1):
            assert a.next() == b.next()


def test_second_start_reuses_the_cache(tok, tmp_path, builds):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    d = _cfg(tmp_path, _jsonl(tmp_path / "a.jsonl", rows))
    first = load_examples(d, *SFT, tok)
    second = load_examples(d, *SFT, tok)
    assert builds == [d.source]  # prepared once
    assert second.gather(range(40)) == first.gather(range(40))
    assert len(list((tmp_path / "cache").glob("sft-*/meta.json"))) == 1


def test_cache_key_changes_with_rows_tokenizer_template_and_options(tok, tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    d = _cfg(tmp_path, path)
    kind = cache.KINDS["sft"]

    def key(d=d, tok=tok, opts=SFT[1]):
        return cache.cache_key(d, kind, opts, tok)[0]

    base = key()
    assert key() == base
    other_tok = build_tokenizer(ModelConfig(name="t"))
    other_tok.add_tokens(["<extra>"])
    templated = build_tokenizer(ModelConfig(name="t", chat_template="{{ messages[0]['content'] }}"))
    changed = {
        "tokenizer": key(tok=other_tok),
        "template": key(tok=templated),
        "max_seq_len": key(d=replace(d, max_seq_len=64)),
        "train_on_prompt": key(opts={"train_on_prompt": True}),
    }
    assert base not in changed.values() and len(set(changed.values())) == 4
    assert key(d=replace(d, on_bad_rows="skip", seed=5)) == base  # applied when reading, not preparing
    _jsonl(path, [{"prompt": f"q{i}", "completion": f"a{i}" if i != 3 else "changed"} for i in range(5)])
    assert key() != base


def test_changed_source_is_prepared_again(tok, tmp_path, builds):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": "one"}])
    d = _cfg(tmp_path, path)
    assert load_examples(d, *SFT, tok)[0] == in_memory(d, *SFT, tok)[0]
    _jsonl(path, [{"prompt": "q", "completion": "another"}])
    assert load_examples(d, *SFT, tok)[0] == in_memory(d, *SFT, tok)[0]
    assert len(builds) == 2


def test_bad_rows_keep_their_file_and_row_on_prepared_data(tok, tmp_path, builds):
    good = {"prompt": "q", "completion": "a"}
    rows = [good, "", "{not json", good, {"prompt": "q"}, [1, 2], good]  # line 2 is blank
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    d = _cfg(tmp_path, path)
    with pytest.raises(DataError) as prepared:
        load_examples(d, *SFT, tok)
    with pytest.raises(DataError) as before:
        tokenize_rows(load_rows(d), tok, d, False)
    assert str(prepared.value) == str(before.value)
    assert f"{path}:row 3: invalid JSON" in str(prepared.value)
    skip = replace(d, on_bad_rows="skip", max_bad_rows_fraction=0.5)
    table = load_examples(skip, *SFT, tok)
    assert table.gather(range(len(table))) == tokenize_rows(load_rows(skip), tok, skip, False)
    assert len(table) == 3 and len(builds) == 1  # the bad-row setting needs no new preparation


def test_parallel_preparation_gives_the_same_examples(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "ROWS_PER_PROC", 50)
    d = _cfg(tmp_path, "synthetic:instruct", num_samples=200, num_proc=2)
    table = load_examples(d, *SFT, tok)
    meta = json.loads(next((tmp_path / "cache").glob("sft-*/meta.json")).read_text())
    assert meta["procs"] == 2 and len(meta["shards"]) == 2
    assert table.gather(range(len(table))) == in_memory(replace(d, cache=False), *SFT, tok)


def test_directory_and_parquet_sources(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    (tmp_path / "shards").mkdir()
    _jsonl(tmp_path / "shards" / "a.jsonl", rows[:3])
    _jsonl(tmp_path / "shards" / "b.jsonl", rows[3:])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    from_dir = load_examples(_cfg(tmp_path, tmp_path / "shards"), *SFT, tok)
    from_parquet = load_examples(_cfg(tmp_path, tmp_path / "all.parquet"), *SFT, tok)
    mem = in_memory(_cfg(tmp_path, tmp_path / "all.parquet"), *SFT, tok)
    assert from_dir.gather(range(6)) == from_parquet.gather(range(6)) == mem


def test_mixture_is_weighted_and_deterministic(tok, tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(30)])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(10)])
    sources = [SourceSpec(source=str(a), weight=1.0), SourceSpec(source=str(b), weight=3.0)]
    d = _cfg(tmp_path, "mixture", sources=sources, seed=3)
    mix = load_examples(d, *SFT, tok)
    assert isinstance(mix, MixedTable) and len(mix) == 40
    texts = [tok.decode(ex["input_ids"]) for ex in mix.gather(range(40))]
    assert sum("<|im_start|>user\nb" in t for t in texts) == 30  # 3/4 of 40: b's 10 rows, each 3 times
    assert len({t for t in texts if "user\na" in t}) == 10  # 1/4 of 40 drawn from a's 30 rows
    again = load_examples(d, *SFT, tok)
    assert [tok.decode(ex["input_ids"]) for ex in again.gather(range(40))] == texts
    other = load_examples(replace(d, seed=4), *SFT, tok)
    assert [tok.decode(ex["input_ids"]) for ex in other.gather(range(40))] != texts


def test_every_row_kind_prepares_as_in_memory(tok, tmp_path):
    pairs = generate("arithmetic_pairs", 20, 0)
    path = _jsonl(tmp_path / "pairs.jsonl", pairs)
    for kind, opts in (("pairs", {}), ("kto", {}), ("prompts", {"need_answer": True})):
        d = _cfg(tmp_path, path)
        table = load_examples(d, kind, opts, tok)
        assert table.gather(range(len(table))) == in_memory(d, kind, opts, tok), kind
    assert len(load_examples(_cfg(tmp_path, path), "kto", {}, tok)) == 40  # a pair is two KTO examples
