"""Continued-pretraining data: documents end with EOS, rows cut the joined stream into
max_seq_len tokens with nothing lost, every token is a target, and with document masking
a packed row never attends across documents (the model gives each document piece the
logits it gives that piece alone)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.batching import collate
from orchestrator.data.chat import IGNORE
from orchestrator.data.prepare import load_examples
from orchestrator.data.table import ListTable
from orchestrator.data.text import TextChunks
from orchestrator.errors import DataError
from orchestrator.models import build_model, build_tokenizer

TEXT = ("text", {"text_field": "text"})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name="t"))


def _docs(tmp_path, tok, n=12):
    d = DataConfig(source="synthetic:text", num_samples=n, cache_dir=str(tmp_path / "cache"))
    return load_examples(d, *TEXT, tok)


def test_rows_cut_the_joined_documents_without_loss(tok, tmp_path):
    docs = _docs(tmp_path, tok)
    assert all(ex["input_ids"][-1] == tok.eos_token_id for ex in docs.gather(range(len(docs))))
    rows = TextChunks(docs, 64, seed=0, document_masking=False)
    stream = [t for r in range(len(rows)) for t in rows[r]["input_ids"]]
    joined = [t for ex in docs.gather(rows.order) for t in ex["input_ids"]]
    assert stream == joined
    assert all(len(rows[r]["input_ids"]) == 64 for r in range(len(rows) - 1))
    assert rows[0]["labels"] == rows[0]["input_ids"]  # every token a target


def test_txt_files_and_text_rows_are_documents(tok, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "corpus" / "b.txt").write_text("second")
    d = DataConfig(source=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"))
    docs = load_examples(d, *TEXT, tok)
    assert [tok.decode(ex["input_ids"]) for ex in docs.gather(range(2))] == [
        "first document\nwith two lines<|im_end|>",
        "second<|im_end|>",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:row 2: row needs 'text'"):
        load_examples(DataConfig(source=str(bad), cache_dir=str(tmp_path / "cache")), *TEXT, tok)


@pytest.mark.parametrize("masking", [True, False])
def test_document_masking_keeps_attention_inside_documents(tok, tmp_path, masking):
    model = build_model(ModelConfig(name="t"), torch.float32).eval()
    docs = ListTable(_docs(tmp_path, tok, n=6).gather(range(6)))
    row = TextChunks(docs, 1 << 12, seed=0, document_masking=masking)[0]  # all documents in one row
    batch = collate([row], tok.pad_token_id)
    starts = [0, *itertools.accumulate(len(ex["input_ids"]) for ex in docs.gather(TextChunks(docs, 1, 0, False).order))]
    assert [i for i, p in enumerate(row["position_ids"]) if p == 0] == (starts[:-1] if masking else [0])
    assert [row["labels"][s] for s in starts[:-1]] == (
        [IGNORE] * 6 if masking else row["input_ids"][:1] + [row["input_ids"][s] for s in starts[1:-1]]
    )
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        a, b = starts[2], starts[3]  # a document in the middle of the row
        alone = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
    same = torch.allclose(packed[a:b], alone, atol=1e-5, rtol=1e-4)
    assert same is masking  # without masking, the document sees the ones before it
