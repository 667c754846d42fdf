"""Preference rows -> prompt / chosen / rejected ids through the one chat encoder."""

from __future__ import annotations

import json

import pytest

from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.chat import encode_prompt, split_completion
from orchestrator.data.preference import PairTokenizer, to_pair, tokenize_pairs
from orchestrator.data.sources import load_rows
from orchestrator.errors import DataError
from orchestrator.models import build_tokenizer

END = 4  # <|im_end|>


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


def _b(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _pairs(tok, tmp_path, rows, **kw):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = DataConfig(source=str(path), **kw)
    return tokenize_pairs(load_rows(d), tok, d)


def test_string_and_message_rows_give_the_same_ids(tok, tmp_path):
    user = [{"role": "user", "content": "2+2?"}]
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        # TRL's implicit prompt: the shared leading messages
        {
            "chosen": user + [{"role": "assistant", "content": "4"}],
            "rejected": user + [{"role": "assistant", "content": "5"}],
        },
    ]
    want = {
        "prompt_ids": encode_prompt(tok, user),
        "chosen_ids": _b(tok, "4") + [END] + _b(tok, "\n"),
        "rejected_ids": _b(tok, "5") + [END] + _b(tok, "\n"),
    }
    assert _pairs(tok, tmp_path, rows) == [want] * 3


def test_multi_turn_prompt_keeps_history(tok):
    prompt = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    p, c, r = to_pair({"prompt": prompt, "chosen": "yes", "rejected": "no"})
    pair = PairTokenizer(tok, 512, True)(p, c, r)
    assert pair["prompt_ids"] == encode_prompt(tok, prompt)
    assert pair["chosen_ids"] == split_completion(tok, prompt, c)[1]


def test_truncation_cuts_the_prompt_from_the_left(tok):
    p, c, r = to_pair({"prompt": "x" * 40, "chosen": "abcdef", "rejected": "ab"})
    full = PairTokenizer(tok, 512, True)(p, c, r)
    assert len(full["prompt_ids"]) > 20 and len(full["chosen_ids"]) == 8
    cut = PairTokenizer(tok, 30, True)(p, c, r)
    assert cut["prompt_ids"] == full["prompt_ids"][-(30 - 8) :]  # keeps the assistant header
    assert cut["chosen_ids"] == full["chosen_ids"] and cut["rejected_ids"] == full["rejected_ids"]
    # a completion longer than the budget: the prompt keeps half, completions are cut from the right
    p, c, r = to_pair({"prompt": "x" * 40, "chosen": "a" * 50, "rejected": "b" * 50})
    full = PairTokenizer(tok, 512, True)(p, c, r)
    cut = PairTokenizer(tok, 20, True)(p, c, r)
    assert cut["prompt_ids"] == full["prompt_ids"][-10:]
    assert cut["chosen_ids"] == full["chosen_ids"][:10] and cut["rejected_ids"] == full["rejected_ids"][:10]
    with pytest.raises(ValueError, match="exceed data.max_seq_len=20"):
        PairTokenizer(tok, 20, False)(p, c, r)


def test_max_prompt_len_cuts_prompts_first_and_the_run_logs_how_many_rows_were_cut(tok, tmp_path, caplog):
    rows = [
        {"prompt": "x" * 80, "chosen": "abcdef", "rejected": "ab"},  # a long prompt: cut
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},  # a short one: kept whole
    ]
    full = _pairs(tok, tmp_path, rows)
    n = len(full[1]["prompt_ids"])
    assert len(full[0]["prompt_ids"]) > n
    with caplog.at_level("INFO", logger="orchestrator"):
        cut = _pairs(tok, tmp_path, rows, max_prompt_len=n)
    assert cut[0]["prompt_ids"] == full[0]["prompt_ids"][-n:]  # from the left: the assistant header stays
    assert cut[0]["chosen_ids"] == full[0]["chosen_ids"] and cut[1] == full[1]
    assert f"1 of 2 pairs truncated (data.max_prompt_len={n}, data.max_seq_len=512)" in caplog.text
    with pytest.raises(DataError, match=rf"p.jsonl:row 1: the prompt's \d+ tokens exceed data.max_prompt_len={n}"):
        _pairs(tok, tmp_path, rows, max_prompt_len=n, truncate=False)


def test_over_long_row_without_truncation_is_a_bad_row(tok, tmp_path):
    with pytest.raises(DataError, match=r"p.jsonl:row 1: \d+ tokens exceed data.max_seq_len=16"):
        _pairs(
            tok,
            tmp_path,
            [{"prompt": "x" * 40, "chosen": "a", "rejected": "b"}],
            max_seq_len=16,
            truncate=False,
        )


def test_implicit_prompt_needs_a_shared_prefix(tok, tmp_path):
    with pytest.raises(DataError, match="share no leading messages"):
        _pairs(
            tok,
            tmp_path,
            [
                {
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                }
            ],
        )
