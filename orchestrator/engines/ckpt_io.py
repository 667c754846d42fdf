"""Checkpoint files of an engine rank: DCP shards (written synchronously or in the
background) and the rank's own `rank<N>.pt` (scheduler and RNG state).

`dcp.async_save` copies the state dict into new CPU tensors before it returns (DCP's
default stager), so the optimizer steps that follow cannot change what is written; the
file writes and DCP's planning collectives then run on a thread. Those collectives use a
gloo group of their own, so they never interleave with the training collectives of the
main thread. At most one write is in flight per rank.

A write that fails for lack of space, quota, a failing disk or a read-only filesystem
raises StorageError (not a worker failure: restarting would fail the same way) naming the
checkpoint directory, its free space and the cause. torch's C++ writer reports a full disk
as "unexpected pos"; writing through a Python file object keeps the OSError in the chain,
and where it is still lost, a small probe write tells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from orchestrator.checkpoint import storage_error


def local_state(scheduler, device: torch.device) -> dict[str, Any]:
    state = {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def load_local_state(path: str, rank: int, scheduler, device: torch.device) -> None:
    local = Path(path) / f"rank{rank}.pt"
    if not local.exists():  # saved on fewer ranks: this rank starts a fresh RNG stream
        local = Path(path) / "rank0.pt"
    state = torch.load(local, weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"])


class ShardWriter:
    def __init__(self) -> None:
        self._pending = None
        self._pending_path: str | None = None
        self._group: dist.ProcessGroup | None = None

    def save(self, path: str, rank: int, shards: dict[str, Any], local: dict[str, Any], blocking: bool) -> None:
        """Write `local` to rank<rank>.pt, then the DCP `shards` (blocking, or in the background)."""
        self.done(wait=True)
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with open(Path(path) / f"rank{rank}.pt", "wb") as f:
                torch.save(local, f)
            if blocking:
                dcp.save(shards, checkpoint_id=path)
                return
            if self._group is None:  # collective: every rank saves together
                self._group = dist.new_group(backend="gloo")
            self._pending = dcp.async_save(shards, checkpoint_id=path, process_group=self._group)
            self._pending_path = path
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            _raise_if_storage(exc, path)
            raise

    def done(self, wait: bool = False) -> bool:
        """Whether the last write is on disk; raises the write's error, if it failed."""
        if self._pending is None:
            return True
        if not wait and not self._pending.done():
            return False
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            _raise_if_storage(exc, self._pending_path or ".")
            raise
        return True


def _raise_if_storage(exc: BaseException, path: str) -> None:
    err = storage_error(exc, path)
    if err is not None:
        raise err from exc
