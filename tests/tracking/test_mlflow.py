"""MLflow against a real tracking server on localhost (sqlite backend, started by the tests):
every step is in the run, a resumed run continues it without holding a step twice, the
export lands as an artifact and a PROMOTE from the evaluation gate registers it as a model
version; a server that is unreachable at the start or stopped mid-run costs a bounded
stall, once, and training finishes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.config.logger import LoggerConfig, MlflowLoggerConfig
from orchestrator.tracking import Tracker
from orchestrator.tracking.mlflow_sink import read_record
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def _cfg(uri: str, timeout_s: float = 10.0, **mlflow) -> SimpleNamespace:
    logger = LoggerConfig(
        project="tracking-tests",
        timeout_s=timeout_s,
        plots=False,
        mlflow=MlflowLoggerConfig(tracking_uri=uri, **mlflow),
    )
    return SimpleNamespace(logger=logger, run=SimpleNamespace(name="t"))


def _history(client, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_resumed_tracker_continues_the_run_without_holding_a_step_twice(mlflow_server, mlflow_client, tmp_path):
    config = {"train": {"lr": 1e-4, "max_steps": 6}, "model": {"name": "tiny"}}
    first = Tracker(_cfg(mlflow_server.uri), tmp_path, config, total_steps=6, start_step=0)
    for step in range(1, 6):
        first.log_step(step, {"loss": 1.0 / step, "tokens": 100, "step_time": 0.5})
    first.close()  # the run stops after step 5; its last checkpoint is step 3
    run_id = read_record(tmp_path)["run_id"]
    assert mlflow_client.get_run(run_id).info.status == "KILLED"

    resumed = Tracker(_cfg(mlflow_server.uri), tmp_path, config, total_steps=6, start_step=3)
    for step in range(4, 7):
        resumed.log_step(step, {"loss": 1.0 / step, "tokens": 100, "step_time": 0.5})
    resumed.finish({"steps": 6, "final_loss": 1 / 6, "exports": {}})
    resumed.close()

    assert read_record(tmp_path)["run_id"] == run_id
    assert _history(mlflow_client, run_id) == [(s, pytest.approx(1.0 / s)) for s in range(1, 7)]
    assert [s for s, _ in _history(mlflow_client, run_id, "tokens_per_s")] == list(range(1, 7))
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["model.name"] == "tiny"
    assert run.data.metrics["summary/final_loss"] == pytest.approx(1 / 6)
    exp = mlflow_client.get_experiment_by_name("tracking-tests")
    assert [r.info.run_id for r in mlflow_client.search_runs([exp.experiment_id])] == [run_id]


def test_server_unreachable_at_start_falls_back_to_the_local_store_within_the_bound(tmp_path, caplog):
    with socket.socket() as hole:  # accepts connections, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        t = time.time()
        with caplog.at_level("INFO", logger="orchestrator"):
            tracker = Tracker(_cfg(uri, timeout_s=3.0), tmp_path, {"a": 1}, total_steps=3, start_step=0)
            assert time.time() - t < 2.0  # the connection is tried off the training thread
            for step in (1, 2, 3):
                s = time.time()
                tracker.log_step(step, {"loss": float(step)})
                assert time.time() - s < 0.5
            tracker.finish({"steps": 3, "exports": {}})
            tracker.close()
    assert caplog.text.count(f"MLflow: cannot reach {uri}") == 1
    record = read_record(tmp_path)
    assert record["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    from mlflow import MlflowClient

    local = MlflowClient(record["tracking_uri"])
    assert _history(local, record["run_id"]) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


class StopServerAtStep:
    """Callback: SIGKILL the MLflow server's process group at the end of step
    `extra.stop_server_at`; writes each step's end time to `extra.marks`."""

    def __init__(self, cfg):
        self.pgid, self.at, self.marks = cfg.extra["stop_server_pgid"], cfg.extra["stop_server_at"], cfg.extra["marks"]
        self.times: dict[int, float] = {}

    def on_step_end(self, step: int, metrics) -> None:
        if step == self.at:
            os.killpg(self.pgid, signal.SIGKILL)
        self.times[step] = time.time()
        Path(self.marks).write_text(json.dumps(self.times))


def test_sft_run_continues_its_mlflow_run_on_resume_and_registers_the_promoted_export(
    run_main, mlflow_server, mlflow_client
):
    common = [
        "+experiment=sft_arith_warmup",
        "data.num_samples=400",
        "train.warmup_steps=0",
        "checkpoint.every_steps=2",
        "logger=[mlflow,tensorboard]",
        f"logger.mlflow.tracking_uri={mlflow_server.uri}",
        "logger.project=tracking-e2e",
    ]
    rc, run = run_main(*common, "train.max_steps=4", name="sft")
    assert rc == 0
    run_id = read_record(run)["run_id"]
    rc, run = run_main(
        *common,
        "train.max_steps=8",
        "run.eval_after=true",
        "eval.tasks=[{kind:nll,items:40}]",
        "logger.mlflow.registered_model=tiny-arith",
        name="sft",
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["eval_decision"] == "PROMOTE"
    # One MLflow run for the whole training run: every step once, the values of metrics.jsonl.
    assert read_record(run)["run_id"] == run_id and run_id in summary["trackers"]["MLflow"]
    losses = [(m["step"], pytest.approx(m["loss"])) for m in read_metrics(run)]
    assert _history(mlflow_client, run_id) == losses and len(losses) == 8
    train = mlflow_client.get_run(run_id)
    assert train.info.status == "FINISHED" and train.data.params["stage.name"] == "sft"
    assert {f.path for f in mlflow_client.list_artifacts(run_id, "export/hf")} >= {"export/hf/config.json"}
    assert {f.path for f in mlflow_client.list_artifacts(run_id, "plots")} >= {"plots/loss.png", "plots/lr.png"}
    # The eval is a run of its own with the report; the PROMOTE registered the export it judged.
    eval_id = read_record(run / "eval")["run_id"]
    assert eval_id != run_id and mlflow_client.get_run(eval_id).info.status == "FINISHED"
    assert {f.path for f in mlflow_client.list_artifacts(eval_id, "eval")} >= {"eval/report.json", "eval/report.md"}
    (version,) = mlflow_client.search_model_versions("name='tiny-arith'")
    assert (version.source, version.run_id) == (f"runs:/{run_id}/export/hf", run_id)
    report = json.loads((run / "eval" / "report.json").read_text())
    nll = next(m for m in report["metrics"] if m["key"] == "nll_heldout/nll")
    assert version.tags["eval.decision"] == "PROMOTE"
    assert float(version.tags["eval.nll_heldout/nll.delta"]) == pytest.approx(nll["delta"], rel=1e-5)
    local = json.loads((run / "export" / "hf" / "config.json").read_text())
    registered = mlflow_client.download_artifacts(run_id, "export/hf/config.json", str(run / "dl"))
    assert json.loads(Path(registered).read_text()) == local


def test_server_stopped_mid_run_costs_at_most_the_stall_and_training_finishes(run_main, mlflow_server, tmp_path):
    marks, timeout_s = tmp_path / "marks.json", 5
    rc, run = run_main(
        "+experiment=sft_tiny",
        "train.max_steps=6",
        "data.num_samples=200",
        "checkpoint.every_steps=0",
        "checkpoint.export_hf=false",
        "logger=[mlflow]",
        f"logger.mlflow.tracking_uri={mlflow_server.uri}",
        f"logger.timeout_s={timeout_s}",
        "run.callbacks=[tests.tracking.test_mlflow:StopServerAtStep]",
        f"+extra.stop_server_pgid={mlflow_server.proc.pid}",
        "+extra.stop_server_at=2",
        f"+extra.marks={marks}",
    )
    end = time.time()
    assert rc == 0 and [m["step"] for m in read_metrics(run)] == list(range(1, 7))
    step_ends = {int(k): v for k, v in json.loads(marks.read_text()).items()}
    # After the last step: the final checkpoint, the charts, and MLflow's give-up (<= timeout_s).
    assert end - step_ends[6] < timeout_s + 20, end - step_ends[6]
    text = (run / "train.log").read_text()
    assert text.count("MLflow: log metrics failed") == 1 and text.count("MLflow: gave up after failing") <= 1
    assert "training goes on" in text
    from mlflow import MlflowClient

    store = MlflowClient(f"sqlite:///{mlflow_server.root}/mlflow.db")  # what the server kept
    assert {s for s, _ in _history(store, read_record(run)["run_id"])} <= {1, 2}
