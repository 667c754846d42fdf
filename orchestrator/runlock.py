"""A lock on a run directory, held by the run's driver for the whole run.

Two runs writing one run directory overwrite each other's checkpoints and interleave
`metrics.jsonl`; the second one must refuse, naming the holder. The lock works on shared
storage (NFS) and survives its holder being killed:

- Taking it is atomic without `flock` (which NFS may not honour across clients): the
  holder's record (host, pid, start time, boot id, a random token) is written to a file of
  its own, then hard-linked to `<run dir>/.run.lock`. `link` fails if the lock exists, on
  every POSIX filesystem and NFS version, and the record is complete the moment the lock
  is visible (the classic NFS-safe lock of liblockfile; an O_EXCL create would expose an
  empty file until written). A lost NFS reply is caught by the link count of our file.
- The holder refreshes the lock's mtime every `heartbeat_s` (a lease).
- A lock is stale when its holder cannot be running: on the same host (same boot) its pid
  is gone, a zombie or a different process (start time); on another host, or after a
  reboot, its lease is older than `lease_s`. Ages are measured against the mtime of a file
  created just now in the same directory, so NFS client clocks never enter.
- A stale lock is moved aside by rename, by one taker at a time (a second lock,
  `.run.lock.break`, taken the same way), after checking that it is still the one judged
  stale; if a fresh lock was moved all the same, it is linked back. Then the taker tries
  again.
- Within one process the lock nests: the launchers take it before Ray starts (a busy run
  directory is refused in a second, not after the cluster is up), and the driver's own
  `with RunDirLock(...)` inside then holds it already.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from orchestrator.errors import RunDirLockedError

log = logging.getLogger("orchestrator")

LOCK_NAME = ".run.lock"
BREAK_STALE_S = 30.0
"""Seconds after which a taker's lock on breaking a stale lock is itself stale."""
_HELD: dict[Path, RunDirLock] = {}
"""The run dirs this process holds (resolved path -> the outermost lock): a nested take is a no-op."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _pid_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def _pid_alive(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if _pid_state(pid) in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return proc_start is None or _proc_start(pid) in (None, proc_start)


def describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = datetime.fromtimestamp(started).isoformat(sep=" ", timespec="seconds") if started else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


class RunDirLock:
    """Context manager: `with RunDirLock(run_dir): ...` holds the run dir or raises
    RunDirLockedError naming the live holder. `lost` turns true if the lease expired and
    another run took the directory over (e.g. this process was suspended for minutes)."""

    def __init__(self, run_dir: os.PathLike | str, heartbeat_s: float = 10.0, lease_s: float = 60.0):
        if lease_s <= 2 * heartbeat_s:
            raise ValueError("lease_s must exceed two heartbeats")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self.token = uuid.uuid4().hex
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "boot_id": _boot_id(),
            "proc_start": _proc_start(os.getpid()),
            "token": self.token,
            "lease_s": lease_s,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nested = False
        self.lost = False

    # ------------------------------------------------------------------ public
    def __enter__(self) -> RunDirLock:  # noqa: PYI034
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = self.run_dir.resolve()
        if key in _HELD:  # this process holds it already (a launcher took it first)
            self._nested = True
            return
        mine = self.run_dir / f"{LOCK_NAME}.{self.token}"
        _write_synced(mine, json.dumps(self.record))
        try:
            for _ in range(10):  # each round either takes the lock, refuses, or moves a stale one
                if self._link(mine):
                    break
                holder, age = self._read()
                if holder is None and age is None:  # released between our link and our read
                    continue
                stale = self._stale_reason(holder or {}, age)
                if stale is None:
                    lease = f"; its lease was renewed {age:.0f}s ago" if age is not None else ""
                    raise RunDirLockedError(
                        f"run dir {self.run_dir} is in use by another run ({describe(holder or {})}{lease}). "
                        f"Wait for it to finish or use another run.output_dir / run.name. If that run is gone, "
                        f"its lock ({self.path}) counts as stale once its process is gone (same host) or "
                        f"its lease is older than {self.lease_s:g}s (other hosts); deleting it by hand "
                        "also works."
                    )
                self._break(holder, stale)
            else:
                raise RunDirLockedError(f"could not take the lock {self.path}: it keeps changing hands")
        finally:
            _unlink(mine)
        self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
        self._thread.start()
        _HELD[key] = self

    def release(self) -> None:
        if self._nested:
            self._nested = False
            return
        if _HELD.get(self.run_dir.resolve()) is self:
            del _HELD[self.run_dir.resolve()]
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            _unlink(self.path)

    # ----------------------------------------------------------------- helpers
    def _link(self, mine: Path) -> bool:
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # NFS: the link may have been made though the reply was lost
            if mine.stat().st_nlink == 2:
                return True
            raise

    def _read(self) -> tuple[dict[str, Any] | None, float | None]:
        """The holder's record (None if unreadable) and the lease age in seconds (None: no lock)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)  # open, then fstat: fresh attributes on NFS
        except FileNotFoundError:
            return None, None
        try:
            mtime = os.fstat(fd).st_mtime
            raw = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None
        return holder, max(0.0, self._now() - mtime)

    def _now(self) -> float:
        """The storage's clock: the mtime of a file created now, next to the lock."""
        probe = self.run_dir / f"{LOCK_NAME}.now.{self.token}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                _unlink(probe)
        except OSError:
            return time.time()

    def _stale_reason(self, holder: dict[str, Any], age: float | None) -> str | None:
        same_host = holder.get("host") == socket.gethostname()
        if same_host and holder.get("boot_id") == _boot_id() and isinstance(holder.get("pid"), int):
            if _pid_alive(holder["pid"], holder.get("proc_start")):
                return None
            return f"its process {holder['pid']} is gone"
        lease = max(float(holder.get("lease_s") or 0), self.lease_s)
        if age is not None and age > lease:
            where = "this host rebooted since" if same_host else "no heartbeat"
            return f"{where}; lease renewed {age:.0f}s ago (> {lease:g}s)"
        return None

    def _break(self, holder: dict[str, Any] | None, reason: str) -> None:
        """Move the stale lock aside, one taker at a time (`_breaking`), after checking that
        the lock is still the one judged stale."""
        with self._breaking() as ours:
            if not ours:
                return  # another taker is breaking it: the next round sees what it left
            if holder is not None:
                current, _ = self._read()
                if (current or {}).get("token") != holder.get("token"):
                    return  # taken or released since it was judged: judge again
            self._move_aside(holder, reason)

    @contextmanager
    def _breaking(self) -> Iterator[bool]:
        """A second lock, `<lock>.break`, taken like the first (by link) while a stale lock
        is moved aside: without it, two takers judging the same stale lock could move a
        fresh one aside while a third takes the free name. A breaker lock older than
        `BREAK_STALE_S` (its taker died mid-break) is removed."""
        mutex = self.run_dir / f"{LOCK_NAME}.break"
        mine = self.run_dir / f"{LOCK_NAME}.break.{self.token}"
        _write_synced(mine, self.token)
        ours = False
        try:
            deadline = time.monotonic() + BREAK_STALE_S
            while not ours and time.monotonic() < deadline:
                try:
                    os.link(mine, mutex)
                    ours = True
                except FileExistsError:
                    try:
                        if self._now() - os.stat(mutex).st_mtime > BREAK_STALE_S:
                            _unlink(mutex)
                            continue
                    except FileNotFoundError:
                        continue
                    time.sleep(0.05)
            yield ours
        finally:
            try:
                if ours and os.stat(mutex).st_ino == os.stat(mine).st_ino:
                    _unlink(mutex)
            except FileNotFoundError:  # removed as stale meanwhile
                pass
            _unlink(mine)

    def _move_aside(self, holder: dict[str, Any] | None, reason: str) -> None:
        aside = self.run_dir / f"{LOCK_NAME}.stale.{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # released or moved meanwhile
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if holder is not None and (moved or {}).get("token") != holder.get("token"):
            # A fresh lock replaced the stale one between our read and our rename: put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("run dir %s: taking over a stale lock (%s): %s", self.run_dir, describe(holder or {}), reason)
        _unlink(aside)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder, _ = self._read()
                if holder is None or holder.get("token") != self.token:
                    if not self.lost:
                        log.error(
                            "run dir %s: this run's lock was taken over by %s (its lease had expired); "
                            "two runs may now write this directory",
                            self.run_dir,
                            describe(holder or {}),
                        )
                    self.lost = True
                    continue
                os.utime(self.path)
            except OSError as exc:  # storage hiccup: retried at the next beat
                log.warning("run dir %s: could not renew the lock (%s)", self.run_dir, exc)


def _write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
