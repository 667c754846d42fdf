"""Checkpointer: when to save, background commits and the resume point (driver side).

It owns the cadence (`checkpoint.every_steps`, the final save, a save on a stop signal),
the background save in flight (`checkpoint.async_save`: committed once every rank has
written) and the resume policy (`checkpoint.resume`). The directory layout, the atomic
commit and retention are `CheckpointManager`'s (orchestrator/checkpoint.py).

What a checkpoint holds: every trained role's shards (the policy's at the top of the
step directory, any other trained role's under `<role>/`), and `meta.json` with the
stage's data position and the run's state. Frozen roles are rebuilt from their source.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from orchestrator.checkpoint import Checkpoint, CheckpointManager
from orchestrator.errors import CheckpointError
from orchestrator.roles import POLICY

log = logging.getLogger("orchestrator")


def role_dir(path: str, role: str) -> str:
    return path if role == POLICY else str(Path(path) / role)


class Checkpointer:
    def __init__(self, ckpt_dir: Path, cfg, meta: Callable[[], dict[str, Any]]):
        """`cfg`: the `checkpoint` config; `meta()`: the run state written with each save."""
        self.cfg = cfg
        self.dir = ckpt_dir
        self.manager = CheckpointManager(ckpt_dir, cfg.keep_last, on_corrupt=str(cfg.on_corrupt), checksum=cfg.checksum)
        self.meta = meta
        self.last: Optional[Path] = None
        """The newest committed checkpoint of this run (resumed from, or saved)."""
        self._pending: Optional[tuple[int, dict[str, Any], float]] = None  # step, meta, start time

    def resume_point(self) -> Optional[Checkpoint]:
        latest = self.manager.latest()
        mode = self.cfg.resume
        if mode == "must" and latest is None:
            raise CheckpointError(
                f"checkpoint.resume=must but no complete checkpoint in {self.dir}. "
                "Use checkpoint.resume=auto to start fresh when none exists."
            )
        if mode == "never" and latest is not None:
            raise CheckpointError(
                f"checkpoint.resume=never but {self.dir} already holds checkpoints (latest: step "
                f"{latest.step}); refusing to overwrite them. Use another run.output_dir / run.name, or "
                "checkpoint.resume=auto to continue."
            )
        self.last = latest.path if latest else None
        return latest

    def latest(self) -> Optional[Checkpoint]:
        return self.manager.latest()

    def maybe_save(self, roles, step: int, total: int, stopping: bool) -> None:
        """Commit a finished background save; save at the cadence, the end, or on a stop."""
        self.commit_pending(roles, wait=False)
        every = self.cfg.every_steps
        if stopping or (every and step % every == 0) or (step == total and self.cfg.save_final):
            # The last save and a save on a stop signal are written before going on.
            blocking = not self.cfg.async_save or stopping or step == total
            self.commit_pending(roles, wait=True)
            self.save(roles, step, blocking)

    def save(self, roles, step: int, blocking: bool = True) -> None:
        """Blocking: every trained role writes, then the directory is committed. Otherwise the
        workers write in the background and `commit_pending` commits once they are done."""
        t = time.time()
        meta = self.meta()

        def write(path: str) -> None:
            for name in roles.trained():
                roles[name].call("save", role_dir(path, name), blocking)

        if blocking:
            self.last = self.manager.save(step, write, meta)
            log.info("checkpoint step %d -> %s (%.1fs)", step, self.last, time.time() - t)
            return
        self.manager.write(step, write)
        self._pending = (step, copy.deepcopy(meta), t)  # the stage moves on before the commit
        log.info("checkpoint step %d: state copied in %.2fs, writing in the background", step, time.time() - t)

    def commit_pending(self, roles, wait: bool) -> None:
        """Commit the background save once every rank of every trained role has written."""
        if self._pending is None:
            return
        step, meta, t = self._pending
        try:
            done = all(all(roles[name].call("save_done", wait)) for name in roles.trained())
        except BaseException as exc:
            self.abort_pending(exc)
            raise
        if not done:
            return
        self._pending = None
        self.last = self.manager.commit(step, meta)
        log.info(
            "checkpoint step %d -> %s (written in the background, %.1fs after the save began)",
            step,
            self.last,
            time.time() - t,
        )

    def abort_pending(self, exc: Optional[BaseException] = None) -> None:
        """Drop a background save whose writers are gone: it is never committed."""
        if self._pending is not None:
            step, self._pending = self._pending[0], None
            self.manager.abort(step, exc)

    def load(self, roles, checkpoint: Checkpoint) -> None:
        for name in roles.trained():
            roles[name].call("load", role_dir(str(checkpoint.path), name))
