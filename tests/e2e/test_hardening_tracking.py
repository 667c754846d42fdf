"""Tracking after faults: `metrics.jsonl` holds each step once after a crash and resume
(a real SIGKILL of the driver, then the same command again), and W&B with an invalid key
and no reachable server gives up online within its bound and logs offline to a run that
`wandb sync` can upload."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from orchestrator.__main__ import main
from orchestrator.config.logger import LoggerConfig, WandbLoggerConfig
from orchestrator.tracking import Tracker
from tests.conftest import REPO, read_metrics


def _cfg(wandb: bool = False, init_timeout_s: float = 30.0) -> SimpleNamespace:
    logger = LoggerConfig(
        project="hardening", timeout_s=init_timeout_s, plots=False, wandb=WandbLoggerConfig() if wandb else None
    )
    return SimpleNamespace(logger=logger, run=SimpleNamespace(name="t"))


def test_resumed_tracker_drops_steps_logged_after_the_checkpoint(tmp_path, caplog):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')  # cut by the crash
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        tracker = Tracker(_cfg(), tmp_path, {}, total_steps=10, start_step=4)
    assert "dropped 4 record(s) after step 4" in caplog.text
    for step in range(5, 11):
        tracker.log_step(step, {"loss": 0.5})
    tracker.rewind(8)  # an in-job restart from the checkpoint of step 8
    for step in (9, 10):
        tracker.log_step(step, {"loss": 0.25})
    tracker.close()
    records = read_metrics(tmp_path)
    assert [m["step"] for m in records] == list(range(1, 11))
    assert [m["loss"] for m in records][4:] == [0.5] * 4 + [0.25] * 2


@pytest.mark.slow
def test_metrics_hold_each_step_once_after_a_crash_and_resume(ray_cluster, tmp_path):
    common = [
        "+experiment=sft_tiny",
        "train.max_steps=8",
        "checkpoint.every_steps=2",
        "logger=console",
        "data.num_samples=300",
        "checkpoint.export_hf=false",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    crashed = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            *common,
            "cluster=ray",
            f"cluster.address={ray_cluster.address}",
            "run.callbacks=[tests.helpers:KillAtStep]",
            "+extra.kill_at_step=5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]  # 5 is after checkpoint 4
    assert main(common) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 9))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is: connections are refused


@pytest.mark.slow
def test_wandb_with_bad_key_and_no_server_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "deadbeef")  # 40 characters, not a key
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    t = time.time()
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        tracker = Tracker(_cfg(wandb=True, init_timeout_s=5.0), tmp_path, {"lr": 1e-4}, total_steps=3, start_step=0)
    took = time.time() - t
    try:
        assert tracker.wandb is not None, caplog.text
        assert took < 45, took
        assert caplog.text.count("W&B: connecting to http://127.0.0.1:") == 1
        assert "init in online mode failed" in caplog.text and "is in use" not in caplog.text
        assert "W&B: offline (online init failed); sync later with `wandb sync" in caplog.text
        for step in (1, 2, 3):
            tracker.log_step(step, {"loss": 1.0})
    finally:
        tracker.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
