"""Continued pretraining: next-token cross-entropy on every token of raw text.

The data path is `data/text.py`: each document is tokenized and ends with EOS, the
documents are joined (in a seeded order) and cut into rows of exactly `data.max_seq_len`
tokens. With `stage.document_masking` (default) position ids restart where a document
starts, so a row's documents never attend to each other (the mask packed SFT rows use),
and the first token of each document part is not a target. The loss and its
normalisation are SFT's (`stages/sft.py`): the mean over every target token of the
global batch. Prepared (cached, memory-mapped) or streamed like SFT data.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.data.batching import BatchSource
from orchestrator.data.kinds import KINDS
from orchestrator.data.prepare import load_examples
from orchestrator.data.streaming import StreamSource
from orchestrator.data.table import ListTable
from orchestrator.data.text import TextChunks
from orchestrator.stages.sft import SftStage

log = logging.getLogger(__name__)


class CptStage(SftStage):
    @classmethod
    def data_kind(cls, cfg) -> tuple[str, dict[str, Any]]:
        return "text", {"text_field": cfg.stage.text_field}

    def batch_source(self, cfg, tokenizer) -> BatchSource | StreamSource:
        """Fixed-length rows of the joined documents, prepared or streamed."""
        d, t, masking = cfg.data, cfg.train, cfg.stage.document_masking
        kind, opts = self.data_kind(cfg)
        if d.streaming:
            log.info("data: streaming %s as text rows of %d tokens", d.source, d.max_seq_len)
            return StreamSource(d, KINDS[kind].build(tokenizer, d, opts), t.global_batch_size, "text", masking)
        docs = load_examples(d, kind, opts, tokenizer)
        rows = TextChunks(docs if not isinstance(docs, list) else ListTable(docs), d.max_seq_len, d.seed, masking)
        source = BatchSource(rows, "packed", d.max_seq_len, t.global_batch_size, d.seed, d.shuffle, False)
        log.info(
            "data: %d documents, %d tokens -> %d rows of %d tokens, %d batches/epoch",
            len(docs),
            int(rows.lengths.sum()),
            len(rows),
            d.max_seq_len,
            source.batches_per_epoch,
        )
        return source
