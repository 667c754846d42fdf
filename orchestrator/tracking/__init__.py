"""Run tracking: console progress, `<run dir>/metrics.jsonl` (every step, always), the
trackers chosen with `logger=[...]` (W&B, MLflow, TensorBoard; several at once), and the
charts of the run in `<run dir>/plots` at its end.

Each tracker fails on its own: one that cannot start, or whose call raises, is dropped
with one line saying what happened, and the others and training go on. What may wait on
a network is bounded by `logger.timeout_s`: W&B's online init (then offline), MLflow's
calls (they run on a thread of their own; see `mlflow_sink`). This module owns the
trackers' tables (`log_table`) and the run's charts (`plots`); stages, the evaluation
report and the benchmarks use them.

Resuming after a crash: the steps between the checkpoint and the crash were logged once
already. `metrics.jsonl` drops its records after the resume step when the tracker starts
(and `rewind(step)` does the same after an in-job restart), so the file holds each step
once, as the resumed run logged it. No tracker holds a step twice either: TensorBoard
purges the steps trained again (`purge_step`), W&B and MLflow skip the steps their run
already holds. Each tracker keeps its run id in the run dir, so a resumed run continues
the same W&B run and the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from orchestrator.tracking.base import Promotion, RunOutputs, Sink, first_line
from orchestrator.tracking.mlflow_sink import MlflowSink, register_model
from orchestrator.tracking.plots import RunData, read_records, write_report
from orchestrator.tracking.tensorboard_sink import TensorBoardSink
from orchestrator.tracking.wandb_sink import WandbSink

log = logging.getLogger("orchestrator")

__all__ = ["Tracker", "register_model", "summary_lines", "TRACKERS"]

TRACKERS: dict[str, Callable[..., Optional[Sink]]] = {
    "wandb": lambda c, name, run_dir, config, start: WandbSink.open(c, name, run_dir, config),
    "mlflow": lambda c, name, run_dir, config, start: MlflowSink(c, name, run_dir, config),
    "tensorboard": lambda c, name, run_dir, config, start: TensorBoardSink.open(c, run_dir, start, config),
}
"""logger option -> opener(logger cfg, run name, run dir, config dict, start step) -> Sink or None."""


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The values a tracker can chart (bools as 0/1)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class Tracker:
    def __init__(self, cfg, run_dir: Path, config_dict: dict[str, Any], total_steps: int, start_step: int):
        self.cfg = cfg.logger
        self.run_name = cfg.run.name
        self.run_dir = run_dir
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self._last_log_time, self._tokens = self.t0, 0
        self._last_step_time: Optional[float] = None
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = None
        self.sinks: list[Sink] = []
        self.finished = False
        self.rewind(start_step)
        for name in self.cfg.trackers:
            self._open(name, config_dict)

    def _open(self, name: str, config_dict: dict[str, Any]) -> None:
        try:
            sink = TRACKERS[name](self.cfg, self.run_name, self.run_dir, config_dict, self.start_step)
        except Exception as exc:  # noqa: BLE001  (a tracker never stops training)
            log.warning("%s: could not start (%s); not logging to it (every step is in metrics.jsonl)", name, exc)
            return
        if sink is not None:
            self.sinks.append(sink)

    def _each(self, what: str, fn: Callable[[Sink], Any]) -> None:
        """`fn` on every tracker; one that raises is dropped, said once."""
        for sink in list(self.sinks):
            try:
                fn(sink)
            except Exception as exc:  # noqa: BLE001  (a tracker never stops training)
                log.warning(
                    "%s: %s failed (%s); continuing without %s (every step is in %s)",
                    sink.name,
                    what,
                    first_line(exc),
                    sink.name,
                    self.metrics_path,
                )
                self.sinks.remove(sink)

    # ------------------------------------------------------------ the W&B run
    @property
    def wandb(self):
        """The W&B run, or None (not chosen, or dropped after a failure)."""
        return next((s.run for s in self.sinks if isinstance(s, WandbSink)), None)

    @property
    def wandb_dir(self) -> Optional[str]:
        return next((s.dir for s in self.sinks if isinstance(s, WandbSink)), None)

    # --------------------------------------------------------------- per step
    def rewind(self, step: int) -> None:
        """Keep the records of `metrics.jsonl` up to `step` (the step training resumes after)
        and append from there: steps logged before a crash or restart are logged again."""
        if self._metrics is not None:
            self._metrics.close()
        _truncate_after(self.metrics_path, step)
        self._metrics = open(self.metrics_path, "a")  # noqa: SIM115  (open for the run, closed in close())
        self._last_step_time = None
        self._each("rewind", lambda s: s.rewind(step))

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.time()
        values = dict(metrics)
        tps = self._throughput(now, metrics)
        if tps is not None:
            values["tokens_per_s"] = tps
        record = {"step": step, "time": round(now - self.t0, 3), **values}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        nums = _numbers(values)
        self._each("log", lambda s: s.log_metrics(step, nums))
        self._progress(step, metrics, now)

    def _throughput(self, now: float, metrics: dict[str, Any]) -> Optional[float]:
        """Tokens/s of this step: over the step's own time when the stage measures it, else
        since the previous step (None for the first step after a start or restart)."""
        tokens, took = metrics.get("tokens"), metrics.get("step_time", metrics.get("time/step"))
        last, self._last_step_time = self._last_step_time, now
        if not tokens:
            return None
        if took:
            return round(tokens / took, 1)
        return round(tokens / (now - last), 1) if last is not None and now > last else None

    def _progress(self, step: int, metrics: dict[str, Any], now: float) -> None:
        self._tokens += metrics.get("tokens", 0)
        if step % self.cfg.log_every and step != self.total:
            return
        done = step - self.start_step
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        tps = self._tokens / max(now - self._last_log_time, 1e-9)
        self._last_log_time, self._tokens = now, 0
        parts = [f"step {step}/{self.total}"]
        if "loss" in metrics:  # an eval step has none: it is left out rather than shown as nan
            parts.append(f"loss {metrics['loss']:.4f}")
        parts += [f"{k} {metrics[k]:.3g}" for k in ("grad_norm", "lr") if k in metrics]
        if tps > 0:
            parts.append(f"tok/s {tps:,.0f}")
        parts += [f"elapsed {_fmt_time(now - self.t0)}", f"ETA {_fmt_time(eta)}"]
        if metrics.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        log.info(" | ".join(parts))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: Optional[int] = None) -> None:
        """A table (e.g. sample completions) to every tracker: a W&B table, TensorBoard text,
        an MLflow table artifact."""
        self._each("table", lambda s: s.log_table(key, columns, rows, step))

    def log_summary(self, summary: dict[str, Any]) -> None:
        """End-of-run numbers (and short strings) to every tracker."""
        self._each("summary", lambda s: s.log_summary(summary))

    # ----------------------------------------------------------------- the end
    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """At the end of a completed run: the charts, the summary numbers, the export and the
        evaluation report to the trackers, the promoted model to MLflow's registry. Returns the
        summary's additions: `plots` (paths) and `trackers` (tracker -> where to find the run)."""
        self.finished = True
        plots = self._plots(summary) if self.cfg.plots else []
        exports = {k: Path(v) for k, v in summary.get("exports", {}).items()} if self.cfg.log_model else {}
        outputs = RunOutputs(exports, _eval_files(summary), plots, _promotion(self.run_dir, summary))
        values = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if isinstance(summary.get("eval_decision"), str):
            values["eval_decision"] = summary["eval_decision"]
        self.log_summary(values)
        self._each("upload", lambda s: s.log_outputs(outputs))
        self._each("flush", lambda s: s.flush())
        trackers = {s.name: _where(s) for s in self.sinks}
        return {"plots": [str(p) for p in plots], "trackers": {k: v for k, v in trackers.items() if v}}

    def _plots(self, summary: dict[str, Any]) -> list[Path]:
        run = RunData(self.run_name, read_records(self.metrics_path), summary)
        try:
            charts, _ = write_report([run], self.run_dir / "plots", f"{self.run_name} ({self.run_dir})")
        except Exception as exc:  # noqa: BLE001  (charts never fail a finished run)
            log.warning("plots: failed (%s); the metrics are in %s", first_line(exc), self.metrics_path)
            return []
        return charts

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        self._each("close", lambda s: s.close(self.finished))
        self.sinks = []


def _where(sink: Sink) -> Optional[str]:
    try:
        return sink.where()
    except Exception:  # noqa: BLE001  (only for the summary's line)
        return None


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records of `path` after `step` (and a line cut by a crash)."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut by the crash
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
        log.info(
            "metrics: dropped %d record(s) after step %d from %s (logged before the restart; logged again now)",
            dropped,
            step,
            path,
        )


def _eval_files(summary: dict[str, Any]) -> list[Path]:
    """An eval run's report (md, json, png) and model card."""
    paths = [summary.get(k) for k in ("eval_report", "eval_report_json", "eval_model_card")]
    if summary.get("eval_report"):
        paths.append(str(Path(summary["eval_report"]).with_suffix(".png")))
    return [Path(p) for p in paths if p and Path(p).is_file()]


def _promotion(run_dir: Path, summary: dict[str, Any]) -> Optional[Promotion]:
    """The model an eval run promoted (`eval_promoted`: a link to its directory), with the
    gate's metrics as tags; None otherwise."""
    promoted = summary.get("eval_promoted")
    if summary.get("eval_decision") != "PROMOTE" or not promoted or not Path(promoted).is_dir():
        return None
    tags = {"eval.decision": "PROMOTE", "eval.run_dir": str(run_dir)}
    report = summary.get("eval_report_json")
    if report and Path(report).is_file():
        for m in json.loads(Path(report).read_text()).get("metrics", []):
            for field in ("candidate", "base", "delta", "p_value"):
                if field in m:
                    tags[f"eval.{m['key']}.{field}"] = f"{m[field]:.6g}"
    return Promotion(Path(promoted).resolve(), tags)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-run summary's lines for the trackers and the charts."""
    lines = [f"  {name + ':':<12} {where}" for name, where in summary.get("trackers", {}).items()]
    plots = [Path(p) for p in summary.get("plots", [])]
    if plots:
        lines.append(f"  plots:       {plots[0].parent} ({', '.join(p.stem for p in plots)}; index.md)")
    return lines
