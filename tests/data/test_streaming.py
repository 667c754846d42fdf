"""Streaming: the in-memory path's batches where both are defined, an exact resume in the
middle of a shard (buffer and partial rows included), and the usual bad-row messages."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.batching import BatchSource
from orchestrator.data.kinds import KINDS
from orchestrator.data.prepare import in_memory
from orchestrator.data.streaming import StreamSource
from orchestrator.errors import DataError
from orchestrator.models import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


def _rows(n, prefix="q"):
    return [{"prompt": f"{prefix}{i} " + "x" * (i % 9), "completion": f"a{i}"} for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _stream(d, tok, mode, batch, kind="sft", masking=False):
    opts = {"train_on_prompt": False} if kind == "sft" else {"text_field": "text"}
    return StreamSource(d, KINDS[kind].build(tok, d, opts), batch, mode, masking)


def test_unshuffled_padded_stream_gives_the_in_memory_batches(tok, tmp_path):
    d = DataConfig(source=str(_jsonl(tmp_path / "a.jsonl", _rows(23))), shuffle=False, group_by_length=False)
    mem = BatchSource(in_memory(d, "sft", {"train_on_prompt": False}, tok), "padded", 512, 4, 0, False, False)
    stream = _stream(d, tok, "padded", 4)
    for _ in range(2 * mem.batches_per_epoch + 1):  # across epoch ends (partial last batch)
        assert stream.next() == mem.next()
        assert stream.epoch == mem.epoch


def _shards(tmp_path):
    (tmp_path / "shards").mkdir()
    _jsonl(tmp_path / "shards" / "a.jsonl", _rows(17, "a"))
    pq.write_table(pa.Table.from_pylist(_rows(11, "b")), tmp_path / "shards" / "b.parquet")
    _jsonl(tmp_path / "shards" / "c.jsonl", _rows(9, "c"))
    return tmp_path / "shards"


@pytest.mark.parametrize("mode", ["packed", "padded", "text"])
def test_resume_mid_shard_continues_with_the_same_next_batch(tok, tmp_path, mode):
    src = _shards(tmp_path)
    if mode == "text":
        for f in ("a.jsonl", "c.jsonl"):  # documents longer than a row: pieces carry over
            _jsonl(src / f, [{"text": f"{f} doc {i} " + "word " * (i * 7 % 40)} for i in range(15)])
        pq.write_table(pa.Table.from_pylist([{"text": f"b {i} " * 9} for i in range(8)]), src / "b.parquet")
    d = DataConfig(source=str(src), max_seq_len=96, shuffle_buffer=6, seed=2)
    kind = "text" if mode == "text" else "sft"
    whole = _stream(d, tok, mode, 3, kind, masking=True)
    seq = [whole.next() for _ in range(30)]  # more than an epoch
    assert whole.epoch >= 1
    buffered = []
    for k in (1, 4, 11, 23):
        first = _stream(d, tok, mode, 3, kind, masking=True)
        for _ in range(k):
            first.next()
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's meta.json holds it
        buffered.append(bool(state["buffer"]))
        resumed = _stream(d, tok, mode, 3, kind, masking=True)
        resumed.load_state_dict(state)
        assert [resumed.next() for _ in range(30 - k)] == seq[k:], k
    assert any(buffered)  # resumed with examples waiting in the shuffle buffer
    mid = _stream(d, tok, mode, 3, kind, masking=True)
    mid.next()
    assert mid.state_dict()["pos"][1] > 0  # stopped inside a shard, not at its start


def test_shuffle_buffer_changes_the_order_deterministically(tok, tmp_path):
    d = DataConfig(source=str(_jsonl(tmp_path / "a.jsonl", _rows(40))), shuffle_buffer=8, seed=1)
    a = [_stream(d, tok, "padded", 5).next() for _ in range(2)]
    unshuffled = _stream(replace(d, shuffle=False), tok, "padded", 5).next()
    assert a[0] == a[1] and a[0] != unshuffled
    assert _stream(replace(d, seed=2), tok, "padded", 5).next() != a[0]


def test_stream_bad_rows_name_file_and_row(tok, tmp_path):
    good = {"prompt": "q", "completion": "a"}
    path = _jsonl(tmp_path / "bad.jsonl", [good, "", good, "{oops", good, {"prompt": "q"}] + [good] * 5)
    d = DataConfig(source=str(path), shuffle=False)
    with pytest.raises(DataError, match=f"{path}:row 4: invalid JSON"):
        _stream(d, tok, "padded", 4).next()
    skip = _stream(replace(d, on_bad_rows="skip"), tok, "padded", 4)
    assert len(skip.next() + skip.next()) == 8  # the 8 good rows make one epoch
    assert skip.epoch == 1 and skip.bad == 2
