"""What one tracker (W&B, MLflow, TensorBoard) implements, what a finished run hands them,
and the two helpers that keep a slow or unreachable tracker from holding training up:
`Background` (calls on a thread of their own, retried while the server is down) and
`bounded` (a call that may hang, abandoned after its bound).

Every method of a `Sink` may raise: the `Tracker` then drops that tracker alone, says so
once, and training goes on (every step is in `metrics.jsonl` regardless).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("orchestrator")


@dataclass
class Promotion:
    """A model the evaluation gate promoted, to register in a model registry."""

    model_dir: Path
    tags: dict[str, str]


@dataclass
class RunOutputs:
    """What a finished run leaves for the trackers that keep files."""

    exports: dict[str, Path] = field(default_factory=dict)
    """Export kind (model, adapter, merged, ...) -> directory."""
    eval_files: list[Path] = field(default_factory=list)
    """The evaluation report (json, md, png) and model card of an eval run."""
    plots: list[Path] = field(default_factory=list)
    promotion: Optional[Promotion] = None


class Sink:
    """One tracker; the defaults do nothing."""

    name = "tracker"

    def where(self) -> Optional[str]:
        """Where a person finds this run in the tracker (a directory, URL or command)."""
        return None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: Optional[int]) -> None:
        pass

    def log_summary(self, values: dict[str, Any]) -> None:
        pass

    def log_outputs(self, outputs: RunOutputs) -> None:
        pass

    def rewind(self, step: int) -> None:
        """Training goes on after `step` again (an in-job restart from its checkpoint)."""

    def flush(self) -> None:
        """Wait (bounded) until what was logged so far has reached the tracker."""

    def close(self, finished: bool) -> None:
        pass


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def bounded(fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run `fn` on a daemon thread and wait at most `timeout_s`; False if it did not return
    in time (it is abandoned). Exceptions propagate."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True, name="tracker-bounded")
    t.start()
    t.join(timeout_s)
    if "exc" in box:
        raise box["exc"]
    return not t.is_alive()


class Background:
    """Runs calls in order on one daemon thread, so that the caller never waits on a server.

    A call that fails with `transient(exc)` true (connection refused, timeout, 5xx) is
    retried every `retry_s` until it succeeds; the first failure and the recovery are said
    once each. Any other failure skips that call (said once per call name). `close` waits
    while calls succeed, and gives up once the calls have been failing for `timeout_s`.
    """

    def __init__(self, name: str, timeout_s: float, transient: Callable[[BaseException], bool]):
        self.name, self.timeout_s, self.transient = name, timeout_s, transient
        self.retry_s = min(5.0, timeout_s)
        self._q: queue.Queue = queue.Queue()
        self._failing_since: Optional[float] = None
        self._said: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"tracker-{name}")
        self._thread.start()

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def submit(self, what: str, fn: Callable[[], Any]) -> None:
        self._q.put((what, fn))

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None or self._stop.is_set():
                return
            self._call(*item)

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001  (a tracker never stops training)
                if not self.transient(exc):
                    if what not in self._said:
                        self._said.add(what)
                        log.warning("%s: %s failed (%s); skipped", self.name, what, first_line(exc))
                    return
                if self._failing_since is None:
                    self._failing_since = time.time()
                    log.warning(
                        "%s: %s failed (%s); training goes on, %s retries in the background "
                        "(every step is in metrics.jsonl)",
                        self.name,
                        what,
                        first_line(exc),
                        self.name,
                    )
                self._stop.wait(self.retry_s)
                continue
            if self._failing_since is not None:
                log.info("%s: reachable again after %.0fs; catching up", self.name, time.time() - self._failing_since)
                self._failing_since = None
            return

    def drain(self) -> bool:
        """Wait for the queued calls; False (and one line) if they were given up: after
        `timeout_s` of failing calls (at once when they have been failing that long)."""
        done = threading.Event()
        self.submit("drain", done.set)
        while not done.wait(0.2) and not self._stop.is_set():
            since = self._failing_since
            if since is not None and time.time() - since >= self.timeout_s:
                self._stop.set()
                log.warning(
                    "%s: gave up after failing for %.0fs (logger.timeout_s=%g); what it did not take is in "
                    "metrics.jsonl and the run dir",
                    self.name,
                    time.time() - since,
                    self.timeout_s,
                )
        return done.is_set()

    def close(self) -> bool:
        """Drain, then end the thread."""
        ok = self.drain()
        self._stop.set()
        self._q.put(None)
        return ok
