"""Checkpoint files of an engine rank: DCP shards (written synchronously or in the
background) and the rank's own `rank<N>.pt` (scheduler and RNG state).

`dcp.async_save` copies the state dict into new CPU tensors before it returns (DCP's
default stager), so the optimizer steps that follow cannot change what is written; the
file writes and DCP's planning collectives then run on a thread. Those collectives use a
gloo group of their own, so they never interleave with the training collectives of the
main thread. At most one write is in flight per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def local_state(scheduler, device: torch.device) -> Dict[str, Any]:
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
        self._group: Optional[dist.ProcessGroup] = None

    def save(self, path: str, rank: int, shards: Dict[str, Any], local: Dict[str, Any], blocking: bool) -> None:
        """Write `local` to rank<rank>.pt, then the DCP `shards` (blocking, or in the background)."""
        self.done(wait=True)
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(local, Path(path) / f"rank{rank}.pt")
        if blocking:
            dcp.save(shards, checkpoint_id=path)
            return
        if self._group is None:  # collective: every rank saves together
            self._group = dist.new_group(backend="gloo")
        self._pending = dcp.async_save(shards, checkpoint_id=path, process_group=self._group)

    def done(self, wait: bool = False) -> bool:
        """Whether the last write is on disk; raises the write's error, if it failed."""
        if self._pending is None:
            return True
        if not wait and not self._pending.done():
            return False
        pending, self._pending = self._pending, None
        pending.result()
        return True
