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
    with pytest.raises(DataError, match="not prefix-stable"):
        SftTokenizer(bad, 512, True, False).encode_many([convo])


def test_encoding_a_batch_gives_the_examples_of_encoding_each_row(tok):
    """Preparation encodes a batch with one tokenizer call: the same ids and labels as one
    row at a time, and a bad row's error in its place (the others unaffected)."""
    u, a, s = "user", "assistant", "system"
    convs = [
        [{"role": u, "content": "2+2?"}, {"role": a, "content": "4"}],
        [{"role": s, "content": "Be brief."}, {"role": u, "content": "hi"}, {"role": a, "content": "hello"}],
        [
            {"role": u, "content": "x"},
            {"role": a, "content": "y"},
            {"role": u, "content": "z"},
            {"role": a, "content": "w"},
        ],
        [{"role": u, "content": "long " * 20}, {"role": a, "content": "cut"}],  # the prompt fills max_seq_len
        ValueError("not a conversation"),
        [{"role": u, "content": "2+2?"}, {"role": a, "content": "4"}],  # a repeated row
    ]
    for train_on_prompt in (False, True):
        for truncate in (True, False):
            enc = SftTokenizer(tok, 40, truncate, train_on_prompt)
            want = []
            for msgs in convs:
                try:
                    want.append(msgs if isinstance(msgs, ValueError) else enc(msgs))
                except ValueError as exc:
                    want.append(exc)
            got = enc.encode_many(convs)
            assert [str(x) if isinstance(x, ValueError) else x for x in got] == [
                str(x) if isinstance(x, ValueError) else x for x in want
            ]
            assert isinstance(got[4], ValueError) and isinstance(got[3], ValueError) == (
                not train_on_prompt or not truncate
            )


def test_batch_encoding_with_merges_across_turn_edges_matches_row_by_row(tok, monkeypatch):
    """BPE tokenizers with merges and a one-letter role header: where no token crosses a
    turn's edge, the batch path takes the edge from the conversation's tokens; where one
    does (a merge spans the header and the reply: with the regex split they are one word),
    it tokenizes the prefixes. Both give the ids and labels of encoding one row at a time."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import orchestrator.data.chat as chat
    from benchmarks.gen_chat import chat_row

    rng = random.Random(0)
    convs = [chat_row(rng)["messages"] for _ in range(60)]
    template = (
        "{% for m in messages %}{{ m['role'][0] + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}a{% endif %}"
    )
    texts = ["".join(m["role"][0] + m["content"] + "<|im_end|>" for m in msgs) for msgs in convs]
    exact: list[int] = []
    real = chat.labels_from_prefixes
    monkeypatch.setattr(chat, "labels_from_prefixes", lambda *a: exact.append(1) or real(*a))
    for use_regex in (True, False):
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        bpe.train_from_iterator(
            texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_end|>"], initial_alphabet=alphabet)
        )
        merged = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
        merged.chat_template = template
        assert merged.apply_chat_template(convs[0], tokenize=False) == texts[0]
        enc = SftTokenizer(merged, 4096, True, False)
        want = [enc(m) for m in convs]
        exact.clear()
        assert enc.encode_many(convs) == want
        if use_regex:
            assert len(exact) == len(convs)  # every row has a merge across an edge: all exact
        else:
            assert not exact  # no merge across an edge: every edge read from the tokens
