"""Sharded checkpoint writes for the engines: DCP, synchronous or in the background.

`dcp.async_save` copies the state dict into new CPU tensors before it returns (DCP's
default stager), so the optimizer steps that follow cannot change what is written; the
file writes and DCP's planning collectives then run on a thread. Those collectives use a
gloo group of their own, so they never interleave with the training collectives of the
main thread. At most one write is in flight per rank.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp


class ShardWriter:
    def __init__(self) -> None:
        self._pending = None
        self._group: Optional[dist.ProcessGroup] = None

    def save(self, state: Dict[str, Any], path: str, blocking: bool) -> None:
        self.done(wait=True)
        if blocking:
            dcp.save(state, checkpoint_id=path)
            return
        if self._group is None:  # collective: every rank saves together
            self._group = dist.new_group(backend="gloo")
        self._pending = dcp.async_save(state, checkpoint_id=path, process_group=self._group)

    def done(self, wait: bool = False) -> bool:
        """Whether the last write is on disk; raises the write's error, if it failed."""
        if self._pending is None:
            return True
        if not wait and not self._pending.done():
            return False
        pending, self._pending = self._pending, None
        pending.result()
        return True
