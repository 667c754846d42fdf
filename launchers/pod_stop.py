"""preStop hooks of the KubeRay pods (launchers/kubernetes.py): checkpoint before a pod goes.

When the RayJob is deleted, its deadline passes, Kueue preempts it or a node is drained,
Kubernetes runs each pod's preStop hook and only then sends SIGTERM, with SIGKILL at the end
of terminationGracePeriodSeconds (cluster.stop_grace_s). The hooks make that time serve a
checkpoint:

    python -m launchers.pod_stop head     # SIGTERM to the driver (it checkpoints after the
                                          # current step and exits), then wait for it
    python -m launchers.pod_stop worker   # wait while this pod still runs the job's actors
                                          # (the driver's exit ends them), so the workers stay
                                          # up for the checkpoint

Both return at once when there is nothing to wait for (the job has finished), and give up
after --timeout seconds. They see the processes of their own container: a pod has its own
PID namespace.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

# Ray's own processes (not a job's actors) that carry a `ray::` title.
RAY_SERVICES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor")


def processes() -> dict[int, list[str]]:
    """pid -> argv of every process visible here (a process title replaces argv)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:  # exited meanwhile
                continue
            if raw:
                found[int(entry.name)] = raw.decode(errors="replace").rstrip("\0").split("\0")
    return found


def is_driver(argv: list[str]) -> bool:
    """`python -m orchestrator ...`: the run's driver (the RayJob's entrypoint)."""
    return any(a == "-m" and b == "orchestrator" for a, b in zip(argv, argv[1:]))


def is_actor(argv: list[str]) -> bool:
    """A Ray worker process running a job's actor or task: titled `ray::Class[.method]`."""
    title = argv[0].split(" ")[0]
    return title.startswith("ray::") and not title.startswith(RAY_SERVICES)


def wait_until_gone(pids: set[int], deadline: float) -> set[int]:
    """Wait until none of `pids` runs (or the deadline); those still running."""
    while pids and time.monotonic() < deadline:
        time.sleep(0.5)
        pids &= set(processes())
    return pids


def stop_driver(timeout_s: float) -> int:
    drivers = {pid for pid, argv in processes().items() if is_driver(argv)}
    for pid in drivers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if drivers:
        pids = ", ".join(map(str, sorted(drivers)))
        print(f"pod_stop: SIGTERM to the driver (pid {pids}); waiting for its checkpoint", flush=True)
    left = wait_until_gone(drivers, time.monotonic() + timeout_s)
    return 1 if left else 0


def wait_for_actors(timeout_s: float) -> int:
    actors = {pid for pid, argv in processes().items() if is_actor(argv)}
    if actors:
        print(f"pod_stop: waiting for {len(actors)} actor process(es) of the job to end", flush=True)
    left = wait_until_gone(actors, time.monotonic() + timeout_s)
    return 1 if left else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.pod_stop", description=__doc__.split("\n")[0])
    p.add_argument("role", choices=["head", "worker"])
    p.add_argument("--timeout", type=float, default=290.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    return stop_driver(args.timeout) if args.role == "head" else wait_for_actors(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
