"""Supervised fine-tuning: next-token cross-entropy on completion tokens.

The loss of a step is the mean over every target token of the global batch (all ranks,
all micro-batches), as in a single-device run with the same batch: each micro-batch
contributes sum(nll) / targets_in_global_batch, times the world size because FSDP and
ZeRO average gradients over ranks. So the loss and the update do not depend on how the
batch is split across workers and micro-batches (TRL/HF average per micro-batch, which
weights short micro-batches up).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from orchestrator.data.batching import BatchSource, count_targets, shard
from orchestrator.data.kinds import KINDS
from orchestrator.data.prepare import load_examples
from orchestrator.data.sft import IGNORE
from orchestrator.data.streaming import StreamSource
from orchestrator.models.logprobs import nll_sum
from orchestrator.stages.base import Stage, step_metrics, train_on_workers

log = logging.getLogger(__name__)


class SftStage(Stage):
    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.source = self.batch_source(cfg, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.world = cfg.cluster.num_workers

    @classmethod
    def data_kind(cls, cfg) -> tuple[str, dict[str, Any]]:
        """The row kind this stage reads (`data/kinds.py`) and its options."""
        return "sft", {"train_on_prompt": cfg.stage.train_on_prompt}

    def batch_source(self, cfg, tokenizer) -> BatchSource | StreamSource:
        """Batches of prepared examples (`data/prepare.py`), or of a stream (`data.streaming`)."""
        d, t = cfg.data, cfg.train
        kind, opts = self.data_kind(cfg)
        if d.streaming:
            log.info("data: streaming %s (%s rows of <= %d tokens)", d.source, d.batching, d.max_seq_len)
            return StreamSource(d, KINDS[kind].build(tokenizer, d, opts), t.global_batch_size, str(d.batching))
        examples = load_examples(d, kind, opts, tokenizer)
        source = BatchSource(
            examples,
            d.batching,
            d.max_seq_len,
            t.global_batch_size,
            seed=d.seed,
            shuffle=d.shuffle,
            group_by_length=d.group_by_length,
        )
        log.info(
            "data: %d examples -> %d %s rows of <= %d tokens, %d batches/epoch",
            len(examples),
            len(source.rows),
            d.batching,
            d.max_seq_len,
            source.batches_per_epoch,
        )
        return source

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or t.epochs * self.source.batches_per_epoch

    def step(self, roles, step: int) -> dict[str, Any]:
        t = time.time()
        per_rank, info = self.next_step()
        results = train_on_workers(roles.policy, per_rank, self.cfg.train.on_nonfinite, step)
        nll = sum(m["nll_sum"] for m in results)
        return {
            "loss": nll / max(info["targets"], 1),
            **step_metrics(results),
            "tokens": info["tokens"],
            "epoch": info["epoch"],
            "step_time": time.time() - t,
        }

    def next_step(self) -> tuple[list[list[dict[str, torch.Tensor]]], dict[str, Any]]:
        """Per-rank micro-batches for one optimizer step, and what every rank must know."""
        batch = self.source.next()
        targets = count_targets(batch)
        ctx = {
            "num_targets": max(targets, 1),
            "world_size": self.world,
            "logits_chunk_mb": self.cfg.train.logits_chunk_mb,
        }
        per_rank = shard(batch, self.world, self.cfg.train.micro_batch_size, self.pad_id)
        info = {
            "tokens": sum(len(r["input_ids"]) for r in batch),
            "targets": targets,
            "rows": len(batch),
            "epoch": self.source.epoch,
        }
        return [[dict(mb, **ctx) for mb in mbs] for mbs in per_rank], info

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["data"])

    @staticmethod
    def loss(model: torch.nn.Module, mb: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        nll = nll_sum(model, mb, mb["logits_chunk_mb"], IGNORE)
        loss = nll * (mb["world_size"] / mb["num_targets"])
        return loss, {"nll_sum": nll.detach()}
