"""MLflow: one MLflow run per run directory, against a tracking server or a local store.

Where: `logger.mlflow.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else (and with
`logger.mode=offline`) a local store in the run dir (`<run dir>/mlflow/mlflow.db`, artifacts
beside it; `mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow/mlflow.db` shows it).
A server that cannot be reached at the start: the local store instead, said once.

What: the resolved config, flattened, as parameters; every step's metrics; sample tables
(`tables/`); at the end the summary numbers (`summary/...`), the export (`export/<kind>`),
the evaluation report (`eval/`) and the charts (`plots/`) as artifacts, and on PROMOTE from
the evaluation gate a new version of `logger.mlflow.registered_model` (:func:`register_model`).

All MLflow calls run on a thread of their own (`Background`): a slow or unreachable server
never holds a training step up; a server that goes down mid-run is retried in the
background and, at the end, given up after `logger.timeout_s` of failing. Each HTTP request
is bounded by `MLFLOW_HTTP_REQUEST_TIMEOUT` (default here: `logger.timeout_s`) and
`MLFLOW_HTTP_REQUEST_MAX_RETRIES` (default here: 0; this module retries by itself).

Resuming: `<run dir>/mlflow/run.json` records the tracking URI and run id, so a resumed
run continues the same MLflow run. MLflow keeps every value logged for a step (a step
logged twice is held twice), so a resumed run sends only the steps after the last one the
MLflow run holds (identical values on a deterministic resume).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

from orchestrator.run_config import flatten
from orchestrator.tracking.base import Background, Promotion, RunOutputs, Sink, first_line

log = logging.getLogger("orchestrator")

RECORD = Path("mlflow") / "run.json"
"""Per run dir: {"tracking_uri", "experiment_id", "run_id", "artifacts": {local dir: artifact path}}."""
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
USER_HTTP_ENV = {k for k in HTTP_ENV if k in os.environ}
"""The HTTP bounds the user set; the others this module sets from `logger.timeout_s`."""
MAX_PENDING = 100_000
"""Steps held for MLflow while its server is down; older ones are dropped (they are in metrics.jsonl)."""
BATCH = 1000  # MLflow's limit of metrics per log_batch
PARAMS_BATCH = 100  # ... and of params


def local_store(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"


def tracking_uri(logger_cfg, run_dir: Path) -> tuple[str, bool]:
    """(the URI to log to, whether it is the run dir's local store)."""
    uri = logger_cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or str(logger_cfg.mode) == "offline":
        return local_store(run_dir), True
    return uri, False


def read_record(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def transient(exc: BaseException) -> bool:
    """A server that is down or overloaded (worth retrying), not a refused request."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, requests.exceptions.RequestException):
            return True
    except ImportError:
        pass
    text = str(exc)
    if "API request to" in text and "failed with exception" in text:  # MLflow's wrap of a requests error
        return True
    status = getattr(exc, "get_http_status_code", None)
    return type(exc).__name__ == "RestException" and callable(status) and status() >= 500


def _key(name: str) -> str:
    """An MLflow metric/param key (letters, digits, _ - . / and spaces; at most 250 characters)."""
    return re.sub(r"[^\w\-./ ]", "_", name)[:250]


def _experiment(client, name: str, artifact_root: Optional[str]) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def _held_step(client, run_id: str) -> int:
    """The last step the MLflow run holds a metric for (0: none)."""
    metrics = client.get_run(run_id).data.to_proto().metrics
    return max((int(m.step) for m in metrics), default=0)


class MlflowSink(Sink):
    name = "MLflow"

    def __init__(self, logger_cfg, run_name: str, run_dir: Path, config_dict: dict[str, Any]):
        self.cfg = logger_cfg
        self.run_name, self.run_dir, self.config = run_name, run_dir, config_dict
        self.uri, self.local = tracking_uri(logger_cfg, run_dir)
        self.client = None
        self.run_id: Optional[str] = None
        self.held = 0  # the last step the MLflow run holds
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._flush_queued = False
        self._dropped = False
        bounds = dict(zip(HTTP_ENV, ("0", str(max(1, round(logger_cfg.timeout_s))))))
        os.environ.update({k: v for k, v in bounds.items() if k not in USER_HTTP_ENV})
        self.bg = Background(self.name, logger_cfg.timeout_s, transient)
        self.bg.submit("start", self._start)

    # ---------------------------------------------------------------- start
    def _start(self) -> None:
        """Open the run on the server, else in the local store; never raises."""
        try:
            from mlflow import MlflowClient  # noqa: F401  (fails here, once, when not installed)
        except ImportError:
            log.warning("MLflow: mlflow is not installed (pip install -e '.[tracking]'); not logging to MLflow")
            return
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (store creation) are noise here
        try:
            self._open(self.uri)
            return
        except Exception as exc:  # noqa: BLE001  (an unreachable server must not stop training)
            if self.local:
                log.warning("MLflow: cannot open the local store %s (%s); not logging to MLflow", self.uri, exc)
                return
            fallback = local_store(self.run_dir)
            log.warning(
                "MLflow: cannot reach %s (%s); logging to the local store %s instead",
                self.uri,
                first_line(exc),
                fallback,
            )
            self.uri, self.local = fallback, True
        try:
            self._open(self.uri)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: cannot open the local store %s (%s); not logging to MLflow", self.uri, exc)

    def _open(self, uri: str) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        record = read_record(self.run_dir) or {}
        run_id = record.get("run_id") if record.get("tracking_uri") == uri else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            self.held = _held_step(client, run_id)
            log.info("MLflow: continuing run %s in %s (it holds steps up to %d)", run_id, uri, self.held)
        else:
            root = (self.run_dir / "mlflow" / "artifacts").resolve().as_uri() if self.local else None
            exp = _experiment(client, self.cfg.project, root)
            tags = {"orchestrator.run_dir": str(self.run_dir), **{t: "" for t in self.cfg.tags}}
            run_id = client.create_run(exp, run_name=self.run_name, tags=tags).info.run_id
            record = {"tracking_uri": uri, "experiment_id": exp, "run_id": run_id, "artifacts": {}}
            _write_record(self.run_dir, record)
            log.info("MLflow: run %s in %s (experiment %s)", run_id, uri, self.cfg.project)
        self.client, self.run_id = client, run_id
        self._log_params()

    def _log_params(self) -> None:
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        params = {_key(k): str(v)[:6000] for k, v in flatten(self.config).items()}
        new = [Param(k, v) for k, v in params.items() if k not in have]
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        for i in range(0, len(new), PARAMS_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + PARAMS_BATCH])
        if changed:  # parameters cannot change in MLflow: the first values stay, the change is a tag
            note = ", ".join(changed)[:8000]
            self.client.log_batch(self.run_id, tags=[RunTag("orchestrator.changed_on_resume", note)])
            log.info("MLflow: %d parameter(s) changed on resume (kept as logged first): %s", len(changed), note)

    # -------------------------------------------------------------- logging
    def where(self) -> Optional[str]:
        if self.run_id is None:
            return None
        if self.local:
            return f"run {self.run_id}; `mlflow ui --backend-store-uri {self.uri}`"
        return f"{self.uri} (experiment {self.cfg.project}, run {self.run_id})"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self._pending.append((step, metrics))
            if len(self._pending) > MAX_PENDING:
                del self._pending[0]
                if not self._dropped:
                    self._dropped = True
                    log.warning(
                        "MLflow: over %d steps held back; dropping the oldest (all are in metrics.jsonl)", MAX_PENDING
                    )
            if self._flush_queued:
                return
            self._flush_queued = True
        self.bg.submit("log metrics", self._flush)

    def _flush(self) -> None:
        from mlflow.entities import Metric

        with self._lock:
            self._flush_queued = False
            records, self._pending = self._pending, []
        if self.run_id is None:
            return
        records = [(s, m) for s, m in records if s > self.held]
        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, s) for s, m in records for k, v in m.items()]
        try:
            for i in range(0, len(batch), BATCH):
                self.client.log_batch(self.run_id, metrics=batch[i : i + BATCH])
        except Exception:
            with self._lock:  # sent again on the retry (MLflow keeps duplicates of a partial batch)
                self._pending = [r for r in records if r[0] > self.held] + self._pending
            raise
        if records:
            self.held = max(self.held, max(s for s, _ in records))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: Optional[int]) -> None:
        data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
        name = re.sub(r"[^\w\-.]+", "_", key)
        path = f"tables/{name}.json" if step is None else f"tables/{name}/step_{step:08d}.json"
        self.bg.submit("log table", lambda: self.run_id and self.client.log_table(self.run_id, data, path))

    def log_summary(self, values: dict[str, Any]) -> None:
        self.bg.submit("log summary", lambda: self._summary(values))

    def _summary(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        nums = [Metric(_key(f"summary/{k}"), float(v), now, self.held) for k, v in values.items() if _number(v)]
        tags = [RunTag(_key(f"summary.{k}"), str(v)[:8000]) for k, v in values.items() if isinstance(v, str)]
        for i in range(0, len(nums), BATCH):
            self.client.log_batch(self.run_id, metrics=nums[i : i + BATCH])
        if tags:
            self.client.log_batch(self.run_id, tags=tags[:PARAMS_BATCH])

    # -------------------------------------------------------------- outputs
    def log_outputs(self, outputs: RunOutputs) -> None:
        for kind, path in outputs.exports.items():
            self.bg.submit(f"upload the export ({kind})", lambda p=path: self._artifacts(p, f"export/{p.name}"))
        for f in outputs.eval_files:
            self.bg.submit(
                "upload the eval report",
                lambda f=f: self.run_id and self.client.log_artifact(self.run_id, str(f), "eval"),
            )
        for f in outputs.plots:
            self.bg.submit(
                "upload the plots", lambda f=f: self.run_id and self.client.log_artifact(self.run_id, str(f), "plots")
            )
        if outputs.promotion is not None and self.cfg.mlflow.registered_model:
            self.bg.submit("register the promoted model", lambda: self._register(outputs.promotion))

    def _artifacts(self, path: Path, artifact_path: str) -> None:
        if self.run_id is None:
            return
        t = time.time()
        self.client.log_artifacts(self.run_id, str(path), artifact_path)
        record = read_record(self.run_dir) or {}
        record.setdefault("artifacts", {})[str(Path(path).resolve())] = artifact_path
        _write_record(self.run_dir, record)
        log.info("MLflow: logged %s as artifact %s (%.1fs)", path, artifact_path, time.time() - t)

    def _register(self, promotion: Promotion) -> None:
        if self.run_id is None:
            return
        version = register_model(self.run_dir, promotion.model_dir, self.cfg.mlflow.registered_model, promotion.tags)
        log.info("MLflow: registered %s as %s", promotion.model_dir, version)

    def flush(self) -> None:
        self.bg.drain()

    def close(self, finished: bool) -> None:
        status = "FINISHED" if finished else "KILLED"
        self.bg.submit("end the run", lambda: self.run_id and self.client.set_terminated(self.run_id, status))
        self.bg.close()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _logged_copy(uri: str, model_dir: Path) -> Optional[tuple[str, str]]:
    """(run id, artifact path) of a run in the same store that logged `model_dir` (its export)."""
    model_dir = model_dir.resolve()
    for run_dir in (model_dir.parent, model_dir.parent.parent, model_dir.parent.parent.parent):
        record = read_record(run_dir)
        if record and record.get("tracking_uri") == uri and str(model_dir) in record.get("artifacts", {}):
            return record["run_id"], record["artifacts"][str(model_dir)]
    return None


def register_model(run_dir: Path, model_dir: Path, name: str, tags: dict[str, str]) -> str:
    """Register `model_dir` as a new version of the registered model `name` (created when
    missing), with `tags`, through the MLflow run recorded in `run_dir` (its tracking URI);
    returns "name/version".

    The version's source is the copy a training run in the same store logged of this model
    (its `export/<kind>` artifact; the version then links to that run); otherwise the model
    is logged first as the artifact `model` of the run in `run_dir`. Raises when `run_dir`
    has no MLflow run or the registry refuses.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    record = read_record(Path(run_dir))
    if record is None:
        raise FileNotFoundError(f"{Path(run_dir) / RECORD}: this run has no MLflow run (logger=mlflow)")
    client = MlflowClient(record["tracking_uri"])
    logged = _logged_copy(record["tracking_uri"], Path(model_dir))
    if logged is None:
        client.log_artifacts(record["run_id"], str(model_dir), "model")
        logged = (record["run_id"], "model")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = {_key(k): str(v)[:8000] for k, v in tags.items()}
    version = client.create_model_version(
        name, f"runs:/{logged[0]}/{logged[1]}", run_id=logged[0], tags=tags, await_creation_for=0
    )
    return f"{name}/{version.version}"
