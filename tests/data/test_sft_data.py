"""Data: loading, completion-only masks, malformed rows, packing and resumable batching."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.batching import BatchSource, collate, count_targets, pack, shard
from orchestrator.data.sft import IGNORE, tokenize_rows
from orchestrator.data.sources import load_rows
from orchestrator.errors import DataError
from orchestrator.models import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(source, **kw):
    return DataConfig(source=str(source), **kw)


def test_completion_only_labels_cover_exactly_the_assistant_turns(tok, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "B2"},
            ]
        }
    ]
    ex = tokenize_rows(load_rows(_cfg(_write_jsonl(tmp_path / "a.jsonl", rows))), tok, _cfg("x"), False)[0]
    trained = tok.decode([t for t in ex["labels"] if t != IGNORE])
    assert trained == "A1<|im_end|>\nB2<|im_end|>\n"
    assert len(ex["labels"]) == len(ex["input_ids"])


def test_prompt_completion_rows_and_train_on_prompt(tok, tmp_path):
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    ex = tokenize_rows(load_rows(_cfg(path)), tok, _cfg(path), False)[0]
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == "4<|im_end|>\n"
    ex_all = tokenize_rows(load_rows(_cfg(path)), tok, _cfg(path), True)[0]
    assert ex_all["labels"] == ex_all["input_ids"]


def test_parquet_source(tok, tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]}), path)
    assert len(tokenize_rows(load_rows(_cfg(path)), tok, _cfg(path), False)) == 2


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"prompt": "x"', "invalid JSON"),
        ({"text": "no chat here"}, "found keys: text"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        (
            {
                "messages": [
                    {"role": "wizard", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "role 'wizard'",
        ),
        ({"prompt": "q", "completion": 5}, "must be strings"),
    ],
)
def test_malformed_row_names_file_row_and_reason(tok, tmp_path, bad, reason):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, bad])
    with pytest.raises(DataError) as e:
        tokenize_rows(load_rows(_cfg(path)), tok, _cfg(path), False)
    assert f"{path}:row 2" in str(e.value) and reason in str(e.value)


def test_skip_bad_rows_up_to_threshold(tok, tmp_path):
    good = [{"prompt": f"q{i}", "completion": "a"} for i in range(9)]
    path = _write_jsonl(tmp_path / "d.jsonl", good + [{"oops": 1}])
    ok = tokenize_rows(
        load_rows(_cfg(path)),
        tok,
        _cfg(path, on_bad_rows="skip", max_bad_rows_fraction=0.2),
        False,
    )
    assert len(ok) == 9
    with pytest.raises(DataError, match="1 of 10 rows are malformed"):
        tokenize_rows(
            load_rows(_cfg(path)),
            tok,
            _cfg(path, on_bad_rows="skip", max_bad_rows_fraction=0.05),
            False,
        )


def test_prompt_longer_than_context_is_a_clear_error(tok, tmp_path):
    path = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 300, "completion": "y"}])
    with pytest.raises(DataError, match="row 1: the prompt fills data.max_seq_len=64"):
        tokenize_rows(load_rows(_cfg(path)), tok, _cfg(path, max_seq_len=64), False)


def test_missing_file_empty_file_and_missing_chat_template(tok, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(_cfg(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        tokenize_rows(load_rows(_cfg(empty)), tok, _cfg(empty), False)
    bare = build_tokenizer(ModelConfig(name="t"))
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template.*model.chat_template"):
        tokenize_rows(load_rows(_cfg("synthetic:instruct", num_samples=2)), bare, _cfg("x"), False)


def test_packed_rows_do_not_attend_across_examples(tok):
    """A packed row gives each example the same logits as running it alone."""
    model = build_model(ModelConfig(name="t"), torch.float32).eval()
    exs = tokenize_rows(load_rows(_cfg("synthetic:instruct", num_samples=6)), tok, _cfg("x"), False)
    row = pack(exs, max_len=4096, seed=0)[0]
    batch = collate([row], tok.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits[0]
        # Walk the row's examples by their position_ids resets.
        pos = row["position_ids"]
        bounds = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in itertools.pairwise(bounds):
            ids = batch["input_ids"][:, a:b]
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-4)
    assert len(bounds) - 1 == len(exs)


def test_batches_resume_exactly_and_cover_an_epoch():
    exs = [{"input_ids": [1] * (i % 7 + 2), "labels": [1] * (i % 7 + 2)} for i in range(23)]
    for mode in ("packed", "padded"):
        src = BatchSource(exs, mode, 16, global_batch=4, seed=3, shuffle=True, group_by_length=True)
        seq = [src.next() for _ in range(2 * src.batches_per_epoch + 1)]
        again = BatchSource(exs, mode, 16, global_batch=4, seed=3, shuffle=True, group_by_length=True)
        for _ in range(5):
            again.next()
        state = again.state_dict()
        resumed = BatchSource(exs, mode, 16, global_batch=4, seed=3, shuffle=True, group_by_length=True)
        resumed.load_state_dict(state)
        assert [resumed.next() for _ in range(len(seq) - 5)] == seq[5:]
        one_epoch = [r for b in seq[: src.batches_per_epoch] for r in b]
        assert len(one_epoch) == len(src.rows)  # partial last batch kept, nothing dropped


def test_partial_batch_gives_every_rank_the_same_number_of_micro_batches(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]}] * 3
    per_rank = shard(rows, world=2, micro=1, pad_id=0)
    assert [len(r) for r in per_rank] == [2, 2]
    # the padding micro-batch carries no targets
    assert (per_rank[1][1]["labels"] == IGNORE).all()
    assert count_targets(rows) == 6
