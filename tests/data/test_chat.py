"""The one chat encoder: exact ids for prompts, completion splits and loss masks."""

from __future__ import annotations

import pytest

from orchestrator.config.schema import ModelConfig
from orchestrator.data.chat import (
    IGNORE,
    assistant_labels,
    encode_prompt,
    render,
    split_completion,
)
from orchestrator.data.sft import SftTokenizer
from orchestrator.errors import DataError
from orchestrator.models import build_tokenizer

START, END = 3, 4  # <|im_start|>, <|im_end|> of the project's byte tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


def _b(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_prompt_is_template_plus_assistant_header_without_extra_specials(tok):
    msgs = [{"role": "user", "content": "ab"}]
    want = [START] + _b(tok, "user\nab") + [END] + _b(tok, "\n") + [START] + _b(tok, "assistant\n")
    assert encode_prompt(tok, msgs) == want
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert encode_prompt(tok, msgs) == tok(text, add_special_tokens=False)["input_ids"]


def test_split_completion_and_sft_labels_agree(tok):
    prompt = [{"role": "user", "content": "2+2?"}]
    answer = [{"role": "assistant", "content": "4"}]
    p, c = split_completion(tok, prompt, answer)
    assert p == encode_prompt(tok, prompt)
    assert c == _b(tok, "4") + [END] + _b(tok, "\n")
    ex = SftTokenizer(tok, 512, True, False)(prompt + answer)
    assert ex["input_ids"] == p + c
    assert ex["labels"] == [IGNORE] * len(p) + c
    assert assistant_labels(tok, prompt + answer, ex["input_ids"]) == ex["labels"]


def test_template_that_is_not_prefix_stable_is_reported(tok):
    bad = build_tokenizer(ModelConfig(name="t"))
    # renders the last message first: rendering k messages is not a prefix of k+1
    bad.chat_template = "{% for m in messages|reverse %}{{ m['content'] }};{% endfor %}"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match="not prefix-stable"):
        split_completion(bad, msgs[:1], msgs[1:])
    with pytest.raises(DataError, match="not prefix-stable"):
        convo = msgs + [{"role": "user", "content": "again"}]
        assistant_labels(bad, convo, render(bad, convo, False))
