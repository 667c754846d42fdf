"""Checkpoint directory layout, atomic commit, retention and discovery (driver side).

    <ckpt dir>/step_00000020/      committed: sharded DCP model+optimizer, rank*.pt, meta.json
    <ckpt dir>/.step_00000040.tmp/ being written (ignored, removed on the next start)

Workers write into the temporary directory; once every rank has returned, the driver
writes `meta.json` (step, data position, run state) and renames the directory into
place. A rename is atomic on POSIX filesystems, so a checkpoint is either complete and
visible or absent: a crash mid-save leaves the previous checkpoint as the latest.
Retention deletes older committed checkpoints only after the new one is committed.

With `checkpoint.async_save`, workers copy their shards in memory and write them from a
background thread while training goes on; the driver commits the directory (meta.json
captured at the step of the save, then the rename) only once every rank reports its
write finished, so the guarantee above holds unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from orchestrator.errors import CheckpointError

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")


@dataclass
class Checkpoint:
    step: int
    path: Path
    meta: Dict[str, Any]


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step_*.tmp"):
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def committed(self) -> List[Checkpoint]:
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / "meta.json").is_file():
                try:
                    meta = json.loads((p / "meta.json").read_text())
                except (OSError, json.JSONDecodeError):
                    log.warning("ignoring checkpoint %s: unreadable meta.json", p)
                    continue
                out.append(Checkpoint(int(m.group(1)), p, meta))
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> Optional[Checkpoint]:
        found = self.committed()
        return found[-1] if found else None

    def save(self, step: int, write_shards: Callable[[str], None], meta: Dict[str, Any]) -> Path:
        self.write(step, write_shards)
        return self.commit(step, meta)

    def write(self, step: int, write_shards: Callable[[str], None]) -> Path:
        """Have `write_shards` fill a fresh temporary directory for `step` (not yet visible);
        on failure the directory is removed. `commit` makes it a checkpoint."""
        tmp = self._tmp(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_shards(str(tmp))
        except BaseException as exc:
            self.abort(step, exc)
            raise  # abort raises for OSError; anything else propagates unchanged
        return tmp

    def commit(self, step: int, meta: Dict[str, Any]) -> Path:
        """Write meta.json and rename the finished temporary directory into place."""
        final, tmp = self.root / f"step_{step:08d}", self._tmp(step)
        try:
            meta_path = tmp / "meta.json"
            with open(meta_path, "w") as f:
                json.dump(dict(meta, step=step), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # re-saving a step (e.g. after a restart): replace it atomically
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException as exc:
            self.abort(step, exc)
            raise
        self._retain(keep=final)
        return final

    def abort(self, step: int, exc: Optional[BaseException] = None) -> None:
        """Drop the temporary directory of an unfinished save; the previous checkpoint stays."""
        shutil.rmtree(self._tmp(step), ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"saving checkpoint step {step} to {self.root} failed ({exc}); the previous "
                "checkpoint is intact. Free disk space or set checkpoint.dir.") from exc

    def _tmp(self, step: int) -> Path:
        return self.root / f".step_{step:08d}.tmp"

    def _retain(self, keep: Path) -> None:
        done = self.committed()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old.path != keep:
                shutil.rmtree(old.path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
