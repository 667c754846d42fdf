"""Run reward functions in a process pool with a timeout per batch of calls.

Processes, not threads: a hung Python function cannot be stopped from a thread, but its
process can be terminated. Calls are waited for as long as some call completes every
`timeout_s`. After a stall, the calls that had started and not finished are the hung ones
(each call marks its start in shared memory, which works even when the hung call holds
the GIL); the pool is rebuilt and the calls that were only queued behind them run again.
A function that raises or hangs gives no reward for that sample; the caller masks the
sample (it trains on nothing). `reward_timeouts` counts samples with a hung call, and
`reward_errors` samples with a raising one, each sample once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from typing import Any

from orchestrator.rewards import resolve

log = logging.getLogger("orchestrator")

MAX_ROUNDS = 4
"""Pool rebuilds per batch for calls queued behind hung ones; still unscored after: masked."""

_STARTED = None  # in a pool process: the shared start flags, one byte per call of a batch


POOL_START_S = 120.0
"""How long a new pool may take to start its processes and import the reward functions
(spawned interpreters, slow on a loaded node) before it counts as broken."""


def _init_worker(started, names: Sequence[str]) -> None:
    global _STARTED
    _STARTED = started
    for name in names:  # import the reward modules now, not inside the first timed call
        resolve(name)


def _call(job: int, name: str, completion: str, answer: str, kwargs: dict[str, Any]) -> float:
    if _STARTED is not None:
        _STARTED[job] = 1
    return float(resolve(name)(completion, answer, **kwargs))


class RewardRunner:
    def __init__(self, specs: Sequence[Any], timeout_s: float, num_workers: int):
        self.specs = list(specs)
        for s in self.specs:  # fail before training if a name does not resolve
            try:
                resolve(s.name)
            except (KeyError, ImportError, AttributeError) as exc:
                from orchestrator.errors import ConfigError

                raise ConfigError(f"stage.rewards: cannot load reward {s.name!r}: {exc}") from exc
        self.timeout_s = timeout_s
        self.num_workers = max(1, num_workers)
        self._pool = None
        self._started = None
        self._capacity = 0

    def _get_pool(self, calls: int):
        if self._pool is not None and calls > self._capacity:
            self.close()
        if self._pool is None:
            ctx = mp.get_context("spawn")
            self._capacity = max(4096, calls)
            self._started = ctx.RawArray("b", self._capacity)
            names = [sp.name for sp in self.specs]
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker, initargs=(self._started, names))
        return self._pool

    def score(
        self, completions: Sequence[str], answers: Sequence[str]
    ) -> tuple[list[float], list[bool], dict[str, float]]:
        """Weighted reward per sample, a validity mask, and counts of errors/timeouts."""
        calls = [(i, s) for i in range(len(completions)) for s in self.specs]
        values, raised, hung, todo = self._run_calls(calls, completions, answers)
        bad_value = {calls[j][0] for j in raised}
        timed_out = {calls[j][0] for j in hung}
        unscored = {calls[j][0] for j in todo} - timed_out - bad_value
        valid = [i not in bad_value and i not in timed_out and i not in unscored for i in range(len(completions))]
        totals = [0.0] * len(completions)
        per_fn: dict[str, list[float]] = {s.name: [] for s in self.specs}
        for j, value in values.items():
            i, spec = calls[j]
            totals[i] += spec.weight * value
            per_fn[spec.name].append(value)
        self._warn(hung, timed_out, raised, bad_value, unscored)
        stats = {
            "reward_errors": float(len(bad_value)),
            "reward_timeouts": float(len(timed_out)),
            **({"reward_unscored": float(len(unscored))} if unscored else {}),
        }
        for name, vals in per_fn.items():
            if vals:
                stats[f"reward/{name.split(':')[-1]}"] = sum(vals) / len(vals)
        return totals, valid, stats

    def _run_calls(self, calls, completions: Sequence[str], answers: Sequence[str]):
        """Every call in the pool; calls queued behind a hung one run again in a new pool (up to
        MAX_ROUNDS). Returns (values, raised, hung, still unscored) by call index."""
        values: dict[int, float] = {}
        raised: dict[int, str] = {}
        hung: list[int] = []
        todo = list(range(len(calls)))
        for _ in range(1 + MAX_ROUNDS):
            pool = self._get_pool(len(calls))
            for j in todo:
                self._started[j] = 0
            jobs = [
                (
                    j,
                    pool.apply_async(
                        _call,
                        (j, calls[j][1].name, completions[calls[j][0]], answers[calls[j][0]], dict(calls[j][1].kwargs)),
                    ),
                )
                for j in todo
            ]
            stalled = self._wait(jobs, values, raised)
            started = {j for j in stalled if self._started[j]}
            if stalled:
                self.close()  # terminates the hung processes
            hung += sorted(started)
            todo = [j for j in stalled if j not in started]  # only queued behind a hung call: run again
            if not todo or not started:  # done, or no call even started: the pool is broken
                break
        return values, raised, hung, todo

    def _warn(self, hung, timed_out, raised, bad_value, unscored) -> None:
        if timed_out:
            log.warning(
                "rewards: %d call(s) made no progress for stage.reward_timeout_s=%s (%d sample(s) masked); "
                "pool restarted",
                len(hung),
                self.timeout_s,
                len(timed_out),
            )
        if raised:
            log.warning(
                "rewards: %d call(s) raised (first: %s); %d sample(s) masked",
                len(raised),
                raised[min(raised)],
                len(bad_value),
            )
        if unscored:
            log.warning(
                "rewards: %d sample(s) not scored (still queued behind hung calls after %d pool restart(s)); masked",
                len(unscored),
                MAX_ROUNDS,
            )

    def _wait(self, jobs, values: dict[int, float], raised: dict[int, str]) -> list[int]:
        """Collect results until none is left or no call completed for `timeout_s` (a stall: the
        calls left are hung, or queued behind hung ones); returns the calls left."""
        pending = dict(jobs)
        last_progress = time.time()
        starting = True  # until some call runs, the pool may still be starting its processes
        while pending:
            if starting and any(self._started[j] for j in pending):
                starting, last_progress = False, time.time()
            ready = [j for j, job in pending.items() if job.ready()]
            for j in ready:
                try:
                    value = pending.pop(j).get()
                    if not math.isfinite(value):
                        raise ValueError(f"non-finite reward {value}")
                    values[j] = value
                except Exception as exc:  # noqa: BLE001  (the user's function raised: count, mask, go on)
                    raised[j] = f"{type(exc).__name__}: {exc}"
            if ready:
                last_progress = time.time()
            elif time.time() - last_progress > (POOL_START_S if starting else self.timeout_s):
                break
            else:
                time.sleep(0.02)
        return sorted(pending)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
