"""The run-dir lock: real processes racing for one run dir (one wins, the others refuse
naming it), a holder killed with SIGKILL (its lock is stale at once on the same host), a
holder on another host (stale only once its lease expired), and the heartbeat."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.errors import RunDirLockedError
from orchestrator.runlock import LOCK_NAME, RunDirLock
from tests.conftest import REPO

HOLD = """
import os, sys, time
from orchestrator.runlock import RunDirLock
run_dir, start_at, hold_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))  # all racers go at the same instant
try:
    with RunDirLock(run_dir):
        print("HELD", os.getpid(), flush=True)
        with open(os.path.join(run_dir, "holders.txt"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(hold_s)
except Exception as exc:
    print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
    sys.exit(1)
"""


def _holder(run_dir, start_at: float, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(start_at), str(hold_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("stale_lock", [False, True], ids=["free", "stale-lock-left-by-a-lost-node"])
def test_racing_runs_one_wins_the_others_refuse_naming_the_holder(tmp_path, stale_lock):
    if stale_lock:  # every racer judges it stale and tries to move it aside: still one winner
        _plant(tmp_path, "gpu-node-7", age_s=600)
    start_at = time.time() + 3  # after every interpreter has started
    procs = [_holder(tmp_path, start_at, 8) for _ in range(4)]  # held past a late start under load
    outs = [p.communicate(timeout=60)[0] for p in procs]
    winners = [p for p, o in zip(procs, outs) if o.startswith("HELD")]
    assert len(winners) == 1, outs
    assert (tmp_path / "holders.txt").read_text().split() == [str(winners[0].pid)]
    for p, out in zip(procs, outs):
        if p is not winners[0]:
            assert p.returncode == 1 and "REFUSED RunDirLockedError" in out
            assert f"pid {winners[0].pid}" in out and f"host {socket.gethostname()}" in out and "started 20" in out
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(LOCK_NAME)]  # no litter


def test_lock_of_a_sigkilled_run_is_taken_over(tmp_path, caplog):
    p = _holder(tmp_path, 0, 600)
    assert p.stdout.readline().startswith("HELD")
    with pytest.raises(RunDirLockedError, match=f"pid {p.pid}"):
        RunDirLock(tmp_path).acquire()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / LOCK_NAME).exists()  # a killed run leaves its lock behind
    with caplog.at_level(logging.WARNING, logger="orchestrator"), RunDirLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert f"process {p.pid} is gone" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_zombie_holder_is_stale(tmp_path):
    p = _holder(tmp_path, 0, 600)
    assert p.stdout.readline().startswith("HELD")
    os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.5)  # not reaped yet: a zombie, as under a parent that does not wait
    with RunDirLock(tmp_path):
        pass
    p.wait()


def _plant(run_dir, host: str, age_s: float, pid: int = 4242) -> None:
    record = {"host": host, "pid": pid, "started": time.time() - age_s, "boot_id": "x", "token": "t", "lease_s": 60}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_lock_of_another_host_holds_until_its_lease_expires(tmp_path, caplog):
    _plant(tmp_path, "gpu-node-7", age_s=5)
    with pytest.raises(RunDirLockedError, match="host gpu-node-7, pid 4242, started .*renewed 5s ago"):
        RunDirLock(tmp_path).acquire()
    _plant(tmp_path, "gpu-node-7", age_s=120)  # the node was lost two minutes ago
    with caplog.at_level(logging.WARNING, logger="orchestrator"), RunDirLock(tmp_path):
        pass
    assert "stale lock (host gpu-node-7" in caplog.text and "no heartbeat" in caplog.text


def test_a_live_process_on_this_host_holds_the_lock(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = {
            "host": socket.gethostname(),
            "pid": sleeper.pid,
            "started": time.time(),
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "token": "t",
            "lease_s": 60,
        }
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        os.utime(tmp_path / LOCK_NAME, (0, 0))  # an old lease does not matter while the pid lives
        with pytest.raises(RunDirLockedError, match=f"pid {sleeper.pid}"):
            RunDirLock(tmp_path).acquire()
        record["proc_start"] = 1  # the same pid, but another process (pid reuse): stale
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with RunDirLock(tmp_path):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path):
    with RunDirLock(tmp_path, heartbeat_s=0.2, lease_s=1) as lock:
        os.utime(tmp_path / LOCK_NAME, (0, 0))
        time.sleep(0.6)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 1
        assert not lock.lost
        _plant(tmp_path, "gpu-node-7", age_s=0)  # another run broke our lease
        time.sleep(0.6)
        assert lock.lost
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "gpu-node-7"  # not ours to delete
