"""One bad-row policy for SFT, preference and RL prompt rows: same text, same threshold."""

from __future__ import annotations

import json
import logging

import pytest

from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.bad_rows import BadRows
from orchestrator.data.preference import tokenize_pairs
from orchestrator.data.prompts import prompt_rows
from orchestrator.data.sft import tokenize_rows
from orchestrator.data.sources import load_rows
from orchestrator.errors import DataError
from orchestrator.models import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _sft(rows, tok, d):
    return tokenize_rows(rows, tok, d, False)


def _rl(rows, tok, d):
    return prompt_rows(rows, d)


def _pairs(rows, tok, d):
    return tokenize_pairs(rows, tok, d)


GOOD = {
    "sft": {"prompt": "q", "completion": "a"},
    "rl": {"prompt": "q", "answer": "1"},
    "pairs": {"prompt": "q", "chosen": "a", "rejected": "b"},
}
KINDS = {"sft": _sft, "rl": _rl, "pairs": _pairs}


@pytest.mark.parametrize(
    "kind, bad, reason",
    [
        ("sft", {"prompt": "q", "completion": ""}, "empty 'completion'"),
        (
            "sft",
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "message 1 (assistant) is empty",
        ),
        ("rl", {"prompt": "q"}, "RL prompt row has no 'answer'"),
        ("rl", {"question": "q"}, "RL prompt row has no 'answer'"),
        ("rl", {"prompt": "q", "answer": ""}, "empty answer"),
        (
            "pairs",
            {"prompt": "q", "chosen": "a"},
            "preference row needs 'chosen' and 'rejected'",
        ),
        ("pairs", {"prompt": "q", "chosen": "a", "rejected": ""}, "empty 'rejected'"),
        (
            "pairs",
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            "'chosen' and 'rejected' are identical",
        ),
        (
            "pairs",
            {
                "prompt": "q",
                "chosen": [{"role": "assistant", "content": ""}],
                "rejected": "b",
            },
            "'chosen' message 0 (assistant) is empty",
        ),
    ],
)
def test_bad_row_error_and_skip_name_file_row_and_reason(tok, tmp_path, caplog, kind, bad, reason):
    path = _write(tmp_path / "d.jsonl", [GOOD[kind], bad, GOOD[kind]])
    with pytest.raises(DataError) as e:
        KINDS[kind](load_rows(DataConfig(source=str(path))), tok, DataConfig(source=str(path)))
    assert str(e.value).startswith(f"{path}:row 2: {reason}")
    assert "data.on_bad_rows=skip" in str(e.value)
    d = DataConfig(source=str(path), on_bad_rows="skip", max_bad_rows_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.bad_rows"):
        assert len(KINDS[kind](load_rows(d), tok, d)) == 2
    assert f"skipping bad row {path}:row 2: {reason}" in caplog.text
    assert f"skipped 1 malformed rows of 3 (first: {path}:row 2: {reason}" in caplog.text


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_threshold_and_nothing_left_are_the_same_for_every_kind(tok, tmp_path, kind):
    path = _write(tmp_path / "d.jsonl", [GOOD[kind]] * 3 + [{"oops": 1}])
    d = DataConfig(source=str(path), on_bad_rows="skip", max_bad_rows_fraction=0.2)
    with pytest.raises(
        DataError,
        match=r"1 of 4 rows are malformed \(25.0% > data.max_bad_rows_fraction=0.2\)",
    ):
        KINDS[kind](load_rows(d), tok, d)
    only_bad = _write(tmp_path / "bad.jsonl", [{"oops": 1}])
    d = DataConfig(source=str(only_bad), on_bad_rows="skip", max_bad_rows_fraction=1.0)
    with pytest.raises(DataError, match="no usable"):
        KINDS[kind](load_rows(d), tok, d)
    with pytest.raises(DataError, match="has no rows"):
        KINDS[kind]([], tok, d)


def test_prompt_rows_without_answer_when_not_needed(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q"}, {"question": "q2"}])
    rows = prompt_rows(
        load_rows(DataConfig(source=str(path))),
        DataConfig(source=str(path)),
        need_answer=False,
    )
    assert rows == [
        {"messages": [{"role": "user", "content": "q"}], "answer": None},
        {"messages": [{"role": "user", "content": "q2"}], "answer": None},
    ]


def test_bad_rows_warns_row_by_row_up_to_a_cap(caplog):
    policy = BadRows("skip", 1.0, "x")
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.bad_rows"):
        for i in range(15):
            policy.report(f"f.jsonl:row {i + 1}", "bad")
        policy.finish(total=30, kept=15)
    assert caplog.text.count("skipping bad row") == 10
    assert "skipped 15 malformed rows of 30 (first: f.jsonl:row 1: bad)" in caplog.text
