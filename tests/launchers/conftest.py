"""Helpers for the launcher tests: the real entry in-process, free ports, polling."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pytest

SHARED_K8S = Path(__file__).resolve().parents[3] / "shared" / "k8s"
TINY = ["+experiment=sft_tiny", "debug=cpu", "logger=console", "checkpoint.export_hf=false"]


def entry(*args: str) -> int:
    from orchestrator.__main__ import main

    return main(list(args))


def free_port_block(size: int, start: int = 20000, stop: int = 30000) -> int:
    """A base port with `size` consecutive free ports (other Ray clusters run on this host)."""
    for base in range(start, stop, size):
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def wait_for(check: Callable[[], Optional[object]], timeout: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def tiny(tmp_path) -> tuple[list[str], Path]:
    run_dir = tmp_path / "run"
    return [*TINY, f"run.output_dir={run_dir}"], run_dir
