"""Continued pretraining end to end (`+experiment=cpt_tiny`, 2 workers over gloo): the loss
falls on a small generated text corpus, from data prepared once and reused by a second
start; and a streamed corpus trains through the same entry."""

from __future__ import annotations

import json
from statistics import mean

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow
QUIET = ["checkpoint.every_steps=0", "checkpoint.save_final=false", "checkpoint.export_hf=false"]


def test_cpt_loss_falls_on_a_small_text_corpus(run_main, tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    rc, run_dir = run_main("+experiment=cpt_tiny", "train.max_steps=30", cache, *QUIET, name="cpt")
    assert rc == 0
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses
    assert "data: prepared synthetic:text" in (run_dir / "train.log").read_text()
    rc, again = run_main("+experiment=cpt_tiny", "train.max_steps=2", cache, *QUIET, name="cpt_again")
    assert rc == 0
    assert "data: reusing prepared synthetic:text" in (again / "train.log").read_text()
    assert [m["loss"] for m in read_metrics(again)] == losses[:2]  # same data, same first steps


def test_streamed_text_corpus_trains(run_main, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    from orchestrator.data.text import documents

    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in documents(300, 0)))
    rc, run_dir = run_main(
        "+experiment=cpt_tiny", f"data.source={corpus}", "data.streaming=true", "train.max_steps=4", *QUIET
    )
    assert rc == 0
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
