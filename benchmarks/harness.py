"""Interleaved A/B timing with every contender in its own child process.

Each contender is a function `fn(ch, **kwargs) -> report` that builds its setup once,
then loops `while ch.next(): <one unit of work>; ch.done(**extra)`. The parent forks one
child per contender, waits until all are built, then asks for one unit at a time,
alternating the order every round (A B, B A, ...), so that a burst of load from other
processes on the machine hits every contender alike. Only one child works at a time;
the others sit blocked on their pipe. Times are taken inside the child, around the
work alone. The first `warmup` rounds are dropped; medians are reported.

Separate processes give each contender its own peak RSS (the kernel's high-water mark,
reset after the fork), its own torch.distributed state and its own thread pool. On CPU
the children are forked from a parent that has imported torch, transformers and trl but
computed nothing, so a child starts in milliseconds; on GPU they are spawned, since
CUDA does not survive a fork.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------ child side
class Channel:
    """The child's end: `next()` blocks for the parent's go (False: stop), `done()` reports."""

    def __init__(self, conn):
        self.conn = conn
        self._ready = False
        self._t0 = self._c0 = 0.0

    def next(self) -> bool:
        if not self._ready:  # the first call means setup is over
            self.conn.send(("ready", None, None))
            self._ready = True
        if self.conn.recv() == "stop":
            return False
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return True

    def done(self, **extra: Any) -> None:
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        self.conn.send(("step", (wall, cpu), extra))


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def _reset_peak_rss() -> None:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child(conn, fn: Callable, kwargs: dict[str, Any], threads: int) -> None:
    import torch

    code = 0
    try:
        _reset_peak_rss()
        torch.set_num_threads(threads)
        base = _status_kb("VmRSS") / 1024
        report = fn(Channel(conn), **kwargs) or {}
        report.update(rss_start_mb=round(base, 1), rss_peak_mb=round(_status_kb("VmHWM") / 1024, 1))
        report["rss_peak_delta_mb"] = round(report["rss_peak_mb"] - base, 1)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            report["gpu_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        conn.send(("report", report, None))
    except BaseException:  # noqa: BLE001 - any failure goes to the parent as a report
        code = 1
        try:
            conn.send(("error", traceback.format_exc(), None))
        except OSError:
            pass
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit hooks, inherited through fork


# ----------------------------------------------------------------- parent side
def _recv(conn, name: str, timeout: float) -> tuple[str, Any, Any]:
    if not conn.poll(timeout):
        raise BenchError(f"{name}: no answer within {timeout:.0f}s")
    try:
        kind, value, extra = conn.recv()
    except EOFError as exc:
        raise BenchError(f"{name}: child process died") from exc
    if kind == "error":
        raise BenchError(f"{name} failed in its child process:\n{value}")
    return kind, value, extra


def interleave(
    contenders: dict[str, tuple[Callable, dict[str, Any]]],
    warmup: int,
    repeats: int,
    threads: int,
    start_method: str = "fork",
    timeout: float = 900.0,
) -> dict[str, dict[str, Any]]:
    """{name: {"times": [wall s, ...], "cpu_times": [...] (after warm-up), "extras": [...], "report": {...}}}.

    CPU time is the child's process time: with one thread it is the work's cost, and it does
    not grow when other processes take the cores (wall time does), so it cross-checks the
    wall-clock medians on a loaded machine. It leaves out helper processes (reward pool)."""
    ctx = mp.get_context(start_method)
    procs, conns = {}, {}
    try:
        for name, (fn, kwargs) in contenders.items():
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(child, fn, kwargs, threads), name=f"bench-{name}")
            p.start()
            child.close()
            procs[name], conns[name] = p, parent
        for name in contenders:
            _recv(conns[name], name, timeout)  # "ready": built, waiting for the first go
        out = {name: {"times": [], "cpu_times": [], "extras": [], "report": {}} for name in contenders}
        names = list(contenders)
        for r in range(warmup + repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                conns[name].send("step")
                _, (wall, cpu), extra = _recv(conns[name], name, timeout)
                if r >= warmup:
                    out[name]["times"].append(wall)
                    out[name]["cpu_times"].append(cpu)
                    out[name]["extras"].append(extra)
        for name in names:
            conns[name].send("stop")
            out[name]["report"] = _recv(conns[name], name, timeout)[1]
        return out
    finally:
        for name, p in procs.items():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
            conns[name].close()


# ---------------------------------------------------------------------- stats
def summarize(times: list[float], cpu_times: list[float] | None = None) -> dict[str, Any]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    out = {
        "median_s": round(statistics.median(times), 5),
        "p25_s": round(q[0], 5),
        "p75_s": round(q[2], 5),
        "min_s": round(min(times), 5),
        "n": len(times),
        "times_s": [round(t, 5) for t in times],
    }
    if cpu_times:
        out["cpu_median_s"] = round(statistics.median(cpu_times), 5)
    return out


def result(r: dict[str, Any]) -> dict[str, Any]:
    """One contender's entry: timing summary plus its child's report."""
    return {**summarize(r["times"], r["cpu_times"]), **r["report"]}


def median_extra(extras: list[dict[str, Any]], key: str) -> float:
    vals = [e[key] for e in extras if key in e]
    return round(statistics.median(vals), 5) if vals else float("nan")


def ratio(
    name: str, num: float, den: float, goal: float | None, cpu: tuple[float, float] | None = None
) -> dict[str, Any]:
    """num/den against a goal (lower is better); `cpu` = (num, den) in CPU time, reported beside it."""
    value = num / den if den else float("nan")
    out = {"name": name, "value": round(value, 4), "goal": goal, "met": None if goal is None else value <= goal}
    if cpu and cpu[1]:
        out["cpu_value"] = round(cpu[0] / cpu[1], 4)
    return out


def time_ratio(name: str, out: dict[str, dict[str, Any]], a: str, b: str, goal: float | None) -> dict[str, Any]:
    """Median wall time of contender a over b (the goal applies to it), and the same in CPU time."""
    cpu = (out[a].get("cpu_median_s"), out[b].get("cpu_median_s"))
    return ratio(name, out[a]["median_s"], out[b]["median_s"], goal, cpu if None not in cpu else None)


# -------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    for mod in ("trl", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


@functools.cache
def gpu_info() -> dict[str, Any]:
    """Queried in a child process, so that the parent never initialises CUDA (it forks)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_gpu_info)


def _gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": p.name,
        "gpu_mem_gib": round(p.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "gpu_count": torch.cuda.device_count(),
    }
