"""Run reward functions in a process pool with a timeout per batch of calls.

Processes, not threads: a hung Python function cannot be stopped from a thread, but its
process can be terminated. Calls are waited for as long as some call completes every
`timeout_s`; after a stall the remaining calls count as timed out (with every pool
process hung, calls queued behind them are masked too) and the pool is rebuilt. A function
that raises or times out gives no reward for that sample; the caller masks the sample
(it trains on nothing) and the counts are logged.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from typing import Any, Dict, List, Sequence, Tuple

from orchestrator.rewards import resolve

log = logging.getLogger("orchestrator")


def _call(name: str, completion: str, answer: str, kwargs: Dict[str, Any]) -> float:
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

    def _get_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.num_workers)
        return self._pool

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> Tuple[List[float], List[bool], Dict[str, float]]:
        """Weighted reward per sample, a validity mask, and counts of errors/timeouts."""
        pool = self._get_pool()
        jobs = [(i, s, pool.apply_async(_call, (s.name, c, a, dict(s.kwargs))))
                for i, (c, a) in enumerate(zip(completions, answers)) for s in self.specs]
        totals = [0.0] * len(completions)
        valid = [True] * len(completions)
        errors = timeouts = 0
        per_fn: Dict[str, List[float]] = {s.name: [] for s in self.specs}
        first_error = None
        # Progress-based deadline: keep waiting while calls complete; a stall of timeout_s
        # means the remaining calls are stuck (a hung call holds its process forever).
        last_progress = time.time()
        for i, spec, job in jobs:
            try:
                value = job.get(timeout=max(0.01, last_progress + self.timeout_s - time.time()))
                last_progress = time.time()
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
                totals[i] += spec.weight * value
                per_fn[spec.name].append(value)
            except mp.TimeoutError:
                timeouts += 1
                valid[i] = False
            except Exception as exc:  # the user's function raised: count, mask, go on
                last_progress = time.time()
                errors += 1
                valid[i] = False
                first_error = first_error or f"{spec.name}: {type(exc).__name__}: {exc}"
        if timeouts:
            log.warning("rewards: %d call(s) exceeded stage.reward_timeout_s=%s; samples masked, pool restarted",
                        timeouts, self.timeout_s)
            self.close()
        if errors:
            log.warning("rewards: %d call(s) raised (first: %s); samples masked", errors, first_error)
        stats = {"reward_errors": float(errors), "reward_timeouts": float(timeouts)}
        for name, vals in per_fn.items():
            if vals:
                stats[f"reward/{name.split(':')[-1]}"] = sum(vals) / len(vals)
        return totals, valid, stats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
