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

Re-saving a step that exists (after an in-job restart) never deletes the old directory
before the new one is in place: the old one is renamed aside (`.step_N.old`), the new one
renamed in, then the old one deleted; a crash in between is repaired on the next start
(the aside copy is put back if the new one never arrived).

Verification: at commit, `manifest.json` records every file's size and CRC32 (read back
from storage, hashed on a few threads; zlib releases the GIL). `latest()` verifies the
checkpoint it picks: a corrupt one (missing, truncated or altered file) is moved aside to
`step_N.corrupt` and the next older one is tried (`on_corrupt="fallback"`, with a
warning), or the run stops naming the file (`"stop"`). Checkpoints from before manifests
are used unverified, with a line saying so.

A write that fails for lack of space, quota, a failing disk or a read-only filesystem is a
StorageError (`storage_error`), not a worker failure: restarting would fail the same way.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import CheckpointError, CorruptCheckpointError, StorageError

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")
_TMP_RE = re.compile(r"^\.step_(\d{8})\.tmp$")
MANIFEST = "manifest.json"
ON_CORRUPT = ("fallback", "stop")
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "write failed")  # torch's C++ writer


@dataclass
class Checkpoint:
    step: int
    path: Path
    meta: dict[str, Any]


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, on_corrupt: str = "fallback", checksum: bool = True):
        """`on_corrupt`: fallback (resume from the newest intact checkpoint, warning) | stop.
        `checksum`: CRC32 of every file in the manifest (False: sizes only, no read-back)."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r}; valid: {', '.join(ON_CORRUPT)}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.on_corrupt = on_corrupt
        self.checksum = checksum
        self._verified: set = set()  # paths checked (or written) by this process
        self._reported: set = set()  # paths already logged as skipped
        self.root.mkdir(parents=True, exist_ok=True)
        for aside in self.root.glob(".step_*.old"):  # a crash while replacing a step
            final = self.root / aside.name[1 : -len(".old")]
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                log.warning("restoring %s: a crash interrupted replacing it", final)
                os.rename(aside, final)
        for stale in self.root.glob(".step_*.tmp"):
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def committed(self) -> list[Checkpoint]:
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if not m:
                continue
            if not (p / "meta.json").is_file():
                self._report(p, "skipping %s: no meta.json (not a complete checkpoint of this run)")
                continue
            try:
                meta = json.loads((p / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                self._report(p, "skipping checkpoint %s: unreadable meta.json")
                continue
            out.append(Checkpoint(int(m.group(1)), p, meta))
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint that passes `verify`; see `on_corrupt`."""
        for ckpt in reversed(self.committed()):
            try:
                self.verify(ckpt)
                return ckpt
            except CorruptCheckpointError as exc:
                if self.on_corrupt == "stop":
                    raise CorruptCheckpointError(
                        f"{exc}. Move it away to resume from an older checkpoint, or set "
                        "checkpoint.on_corrupt=fallback to do so automatically."
                    ) from None
                aside = ckpt.path.with_name(f"{ckpt.path.name}.corrupt")
                if aside.exists():
                    aside = ckpt.path.with_name(f"{ckpt.path.name}.corrupt-{int(time.time())}")
                os.rename(ckpt.path, aside)
                log.warning("%s; moved it to %s and falling back to the previous checkpoint", exc, aside)
        return None

    def verify(self, ckpt: Checkpoint) -> None:
        """Raise CorruptCheckpointError naming the first file that is missing or differs from
        the manifest written at commit (size, then CRC32)."""
        if ckpt.path in self._verified:
            return
        try:
            manifest = json.loads((ckpt.path / MANIFEST).read_text())
        except FileNotFoundError:
            self._report(ckpt.path, "checkpoint %s has no manifest (saved by an older version): not verified")
            return
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"checkpoint {ckpt.path} is corrupt: {MANIFEST} unreadable ({exc})") from exc
        problem = _check_files(ckpt.path, manifest["files"])
        if problem is not None:
            raise CorruptCheckpointError(f"checkpoint {ckpt.path} is corrupt: {problem}")
        self._verified.add(ckpt.path)

    def _report(self, path: Path, msg: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            log.warning(msg, path)

    def save(self, step: int, write_shards: Callable[[str], None], meta: dict[str, Any]) -> Path:
        self.write(step, write_shards)
        return self.commit(step, meta)

    def write(self, step: int, write_shards: Callable[[str], None]) -> Path:
        """Have `write_shards` fill a fresh temporary directory for `step` (not yet visible);
        on failure the directory is removed. `commit` makes it a checkpoint."""
        tmp = self._tmp(step)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write_shards(str(tmp))
        except BaseException as exc:
            self.abort(step, exc)
            raise  # abort raises for OSError; anything else propagates unchanged
        return tmp

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """Write the manifest and meta.json, then rename the finished temporary directory into
        place. An existing step_N (re-saved after a restart) is renamed aside first and
        deleted only once the new one is in place."""
        final, tmp, aside = self.root / f"step_{step:08d}", self._tmp(step), self.root / f".step_{step:08d}.old"
        moved_aside = False
        try:
            _write_json(
                tmp / MANIFEST,
                {"version": 1, "checksum": "crc32" if self.checksum else None, "files": manifest(tmp, self.checksum)},
            )
            _write_json(tmp / "meta.json", dict(meta, step=step))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
                moved_aside = True
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException as exc:
            if moved_aside and not final.exists():
                os.rename(aside, final)  # the old step_N stays the checkpoint of this step
            self.abort(step, exc)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        self._verified.add(final)
        self._retain(keep=final)
        return final

    def abort(self, step: int, exc: BaseException | None = None) -> None:
        """Drop the temporary directory of an unfinished save; the previous checkpoint stays."""
        tmp = self._tmp(step)
        err = storage_error(exc, str(tmp)) if exc is not None and not isinstance(exc, StorageError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from exc
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"saving checkpoint step {step} to {self.root} failed ({exc}); the previous "
                "checkpoint is intact. Free disk space or set checkpoint.dir."
            ) from exc

    def _tmp(self, step: int) -> Path:
        return self.root / f".step_{step:08d}.tmp"

    def _retain(self, keep: Path) -> None:
        done = self.committed()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old.path != keep:
                shutil.rmtree(old.path, ignore_errors=True)


def manifest(directory: Path, checksum: bool = True) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "crc32"}} of every file under `directory` (read back from storage)."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name not in (MANIFEST, "meta.json"))
    rel = [p.relative_to(directory).as_posix() for p in files]
    if not checksum:
        return {r: {"size": p.stat().st_size} for r, p in zip(rel, files)}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(_crc32, files))
    return {r: {"size": size, "crc32": crc} for r, (size, crc) in zip(rel, sums)}


def _crc32(path: Path) -> tuple:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, f"{crc:08x}"


def _check_files(directory: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first file that is missing or differs from its manifest entry, described; else None."""
    for rel, want in files.items():
        path = directory / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} when saved (truncated or overwritten)"
    todo = [(rel, want) for rel, want in files.items() if want.get("crc32")]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for (rel, want), (_, crc) in zip(todo, pool.map(lambda item: _crc32(directory / item[0]), todo)):
            if crc != want["crc32"]:
                return f"{rel} has CRC32 {crc}, {want['crc32']} when saved (its content changed)"
    return None


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the per-rank failures a DCP CheckpointException holds."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # {rank: (exc, frames)} or {rank: exc}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def _probe(path: str) -> OSError | None:
    """A small synced write next to the checkpoint: the OSError a full or failing disk gives."""
    probe = Path(path) / f".write_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def storage_error(exc: BaseException, path: str) -> StorageError | None:
    """A StorageError for `exc` if it comes from the storage under `path` (a checkpoint's
    temporary directory), else None."""
    cause = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS), None)
    if cause is None and any(
        isinstance(e, RuntimeError) and any(m in str(e) for m in _WRITER_FAILURES) for e in _chain(exc)
    ):
        probed = _probe(path)  # torch's C++ writer dropped the OSError
        cause = probed if probed is not None and probed.errno in STORAGE_ERRNOS else None
    if cause is None:
        return None
    tmp = next((d for d in [Path(path), *Path(path).parents] if _TMP_RE.match(d.name)), Path(path))
    ckpt_dir = tmp.parent
    try:
        usage = shutil.disk_usage(ckpt_dir)
        space = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        space = "free space unknown"
    what = errno.errorcode.get(cause.errno, str(cause.errno))
    m = _TMP_RE.match(tmp.name)
    what_step = f"step {int(m.group(1))}" if m else tmp.name
    return StorageError(
        f"cannot write checkpoint {what_step} in {ckpt_dir}: {what} ({cause.strerror or cause}); the "
        f"filesystem has {space}. The previous checkpoints are untouched. Free space (or quota), fix the "
        "filesystem, or set checkpoint.dir to another volume, then run the same command again to resume."
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
