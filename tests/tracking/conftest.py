"""A real MLflow tracking server on localhost (sqlite backend, artifacts served by it),
started by the tests in its own process group and stopped by its id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT_S = 300.0  # a cold `mlflow server` start on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        with open(self.root / "server.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not up within {START_TIMEOUT_S}s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL the server's process group (the server and its uvicorn workers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def _mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_mlflow_server):
    """The module's server, started again when a test before stopped it."""
    if not _mlflow_server.healthy():
        _mlflow_server.stop()
        _mlflow_server.start()
    return _mlflow_server


@pytest.fixture
def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


GRPO = [
    "+experiment=grpo_math",
    "debug=cpu",
    "run.init_from=null",
    "method=lora",
    "train.max_steps=3",
    "train.lr=1e-2",
    "stage.prompts_per_step=4",
    "rollout.n=4",
    "stage.kl_coef=0.05",
    "stage.rewards=[{name:format,kwargs:{pattern:'[0-9]'}}]",
    "stage.log_samples_every=1",
    "eval.samples=8",
    "checkpoint.every_steps=0",
    "checkpoint.export_hf=false",
]
"""A tiny GRPO run with every RL chart: mixed rewards ("contains a digit" on a random
model), KL to the adapters-off reference, held-out accuracy before and after."""


def _finished_run(root: Path, overrides: list[str]) -> Path:
    from orchestrator.__main__ import main

    run = root / "run"
    assert main([*overrides, f"run.output_dir={run}"]) == 0
    return run


@pytest.fixture(scope="session")
def grpo_run(ray_cluster, tmp_path_factory) -> Path:
    """A finished GRPO run that logged to TensorBoard."""
    return _finished_run(tmp_path_factory.mktemp("grpo"), [*GRPO, "logger=[tensorboard]"])


@pytest.fixture(scope="session")
def sft_run(ray_cluster, tmp_path_factory) -> Path:
    """A finished SFT run (console only)."""
    overrides = ["+experiment=sft_tiny", "train.max_steps=4", "data.num_samples=200", "checkpoint.export_hf=false"]
    return _finished_run(tmp_path_factory.mktemp("sft"), [*overrides, "checkpoint.every_steps=0", "logger=console"])
