"""Rows -> global batches -> per-rank micro-batches, with a resumable position.

* `packed`: examples are concatenated (once, in a seeded order) into rows of at most
  `max_seq_len` tokens; `position_ids` restart at 0 for each example, which `transformers`
  turns into a block-diagonal causal mask, so packed examples never attend to each other.
* `padded`: one example per row; with `group_by_length`, rows of similar length are
  batched together (within mega-batches) to cut padding.

Each epoch visits the rows in a permutation seeded by (seed, epoch). The position is
(epoch, batch index), so a resumed run sees exactly the batches it would have seen.
`examples` are an in-memory list or a prepared table (`data/table.py`: memory-mapped,
rows assembled when a batch reads them, the same rows and order as from the list).
The last batch of an epoch may be partial; every rank still runs the same number of
micro-batches (ranks without data get an all-masked one), because each forward and
backward is a collective under FSDP and unequal counts would hang.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import torch

from orchestrator.data.chat import IGNORE
from orchestrator.data.collate import pad_collate
from orchestrator.data.table import row_lengths, row_view

Row = dict[str, list[int]]


def pack(examples: Sequence[Row], max_len: int, seed: int) -> list[Row]:
    """Concatenate examples, in a seeded order, into rows of at most `max_len` tokens
    (`table.pack_plan` + `table.packed_row`)."""
    return row_view(examples, "packed", max_len, seed)


class BatchSource:
    """Deterministic, resumable iterator over global batches of rows."""

    def __init__(
        self,
        examples: Sequence[Row],
        batching: str,
        max_len: int,
        global_batch: int,
        seed: int,
        shuffle: bool,
        group_by_length: bool,
    ):
        self.rows = row_view(examples, batching, max_len, seed)
        self.global_batch = global_batch
        self.seed, self.shuffle, self.group_by_length = (
            seed,
            shuffle,
            group_by_length and batching == "padded",
        )
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order, self._starts = -1, array("q"), array("q")

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.global_batch)

    def _epoch_batches(self, epoch: int) -> array:
        """Where each batch of `epoch` starts in that epoch's row order (`self._order`);
        arrays, not lists, so that a large corpus costs 8 bytes a row."""
        if self._order_epoch != epoch:
            order = array("q", range(len(self.rows)))
            rng = random.Random(f"{self.seed}-{epoch}")
            if self.shuffle:
                rng.shuffle(order)
            if self.group_by_length:
                mega, lengths = self.global_batch * 16, row_lengths(self.rows)
                order = array(
                    "q",
                    (
                        i
                        for s in range(0, len(order), mega)
                        for i in sorted(order[s : s + mega], key=lambda j: -lengths[j])
                    ),
                )
            starts = array("q", range(0, len(order), self.global_batch))
            if self.group_by_length and self.shuffle:
                rng.shuffle(starts)  # the permutation depends on the length only: as when shuffling batches
            self._order_epoch, self._order, self._starts = epoch, order, starts
        return self._starts

    def next(self) -> list[Row]:
        batches = self._epoch_batches(self.epoch)
        start = batches[self.index]
        batch = [self.rows[i] for i in self._order[start : start + self.global_batch]]
        self.index += 1
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if self.index >= len(self._epoch_batches(self.epoch)):  # saved with a different batch size
            self.epoch, self.index = self.epoch + 1, 0


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (`collate.pad_collate`; kept under its old name)."""
    return pad_collate(rows, pad_id)


def shard(
    batch: Sequence[Any],
    world: int,
    micro: int,
    pad_id: int,
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
    dummy: Any | None = None,
) -> list[list[dict[str, Any]]]:
    """Split a global batch into `world` equal-count lists of collated micro-batches
    (`collate_fn` defaults to `pad_collate`; `dummy` is the no-target row given to ranks
    with fewer micro-batches: `collate.rl_dummy` and `collate.pair_dummy` for RL and pairs)."""
    collate_fn = collate_fn or (lambda rows: collate(rows, pad_id))
    per_rank = [list(batch[r::world]) for r in range(world)]  # strided: balances a partial batch
    n_micro = max(1, max(math.ceil(len(p) / micro) for p in per_rank))
    dummy = dummy or {"input_ids": [pad_id], "labels": [IGNORE], "position_ids": [0]}
    out = []
    for rows in per_rank:
        mbs = [rows[s : s + micro] for s in range(0, len(rows), micro)]
        mbs += [[dummy]] * (n_micro - len(mbs))
        out.append([collate_fn(mb) for mb in mbs])
    return out


def count_targets(batch: Sequence[Row]) -> int:
    """Tokens that carry loss (labels shift by one, so the first label never counts)."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in batch)
