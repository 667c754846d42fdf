"""Run tracking: console progress, a metrics JSONL in the run dir, and W&B.

W&B mode `auto` logs online when an API key is configured and offline otherwise (sync
later with `wandb sync <run dir>/wandb/offline-run-*`). A W&B failure never stops
training: the online attempt is bounded (`logger.wandb_init_timeout_s`, one line while it
waits), then init falls back to offline (same run id, after resetting the W&B service the
failed attempt left holding it; a new id if that still fails), then to none; a failing
`log` warns once. The W&B run id is kept in the run dir, so a resumed run continues the
same W&B run.

Resuming after a crash: the steps between the checkpoint and the crash were logged once
already. `metrics.jsonl` drops its records after the resume step when the tracker starts
(and `rewind(step)` does the same after an in-job restart), so the file holds each step
once, as the resumed run logged it. W&B's step only increases: a resumed online run
skips logging steps it already holds (identical values on a deterministic resume);
W&B's "rewind" (`resume_from=run?_step=N`) is a private preview, not used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("orchestrator")

"""Bound on the online W&B init (W&B's own default is 90 s); becomes
`logger.wandb_init_timeout_s` once the schema has it."""


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker:
    def __init__(self, cfg, run_dir: Path, config_dict: dict[str, Any], total_steps: int, start_step: int):
        self.cfg = cfg.logger
        self.run_dir = run_dir
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self._last_log_time, self._tokens = self.t0, 0
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = None
        self.rewind(start_step)
        self.wandb = None
        self.wandb_dir: str | None = None
        self._wandb_from = 0  # the first step the W&B run does not hold yet
        if self.cfg.wandb and self.cfg.mode != "disabled":
            self._init_wandb(cfg, config_dict)

    def _init_wandb(self, cfg, config_dict: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("W&B: wandb is not installed; logging to console and %s only", self.metrics_path)
            return
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = str(_wandb_mode(self.cfg.mode))
        timeout = self.cfg.wandb_init_timeout_s
        attempts = [(mode, run_id)] + ([("offline", run_id), ("offline", None)] if mode == "online" else [])
        for attempt, attempt_id in attempts:
            attempt_id = attempt_id or uuid.uuid4().hex[:12]
            if attempt == "online":
                log.info(
                    "W&B: connecting to %s (up to %gs; then offline) ...",
                    os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"),
                    timeout,
                )
            try:
                self.wandb = wandb.init(
                    project=self.cfg.project,
                    entity=self.cfg.entity,
                    name=cfg.run.name,
                    id=attempt_id,
                    resume="allow",
                    dir=str(self.run_dir),
                    config=config_dict,
                    tags=list(self.cfg.tags),
                    mode=attempt,
                    settings=wandb.Settings(silent=True, init_timeout=timeout),
                )
            except Exception as exc:  # noqa: BLE001  (network, auth, service start: none may stop training)
                log.warning(
                    "W&B: init in %s mode failed (%s: %s)",
                    attempt,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
                if attempt == "online":
                    _reset_wandb(wandb)  # the failed attempt keeps the run id busy in this process
                continue
            if attempt_id != run_id:
                id_file.write_text(attempt_id)
            self.wandb_dir = str(Path(self.wandb.dir).parent)
            self._wandb_from = int(getattr(self.wandb, "step", 0) or 0)
            if attempt == "offline":
                log.info(
                    "W&B: offline (%s); sync later with `wandb sync %s`",
                    "no API key" if mode == "offline" else "online init failed",
                    self.wandb_dir,
                )
            return
        log.warning("W&B: disabled for this run; metrics are still in %s", self.metrics_path)

    def rewind(self, step: int) -> None:
        """Keep the records of `metrics.jsonl` up to `step` (the step training resumes after)
        and append from there: steps logged before a crash or restart are logged again."""
        if self._metrics is not None:
            self._metrics.close()
        kept, dropped = [], 0
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    ok = json.loads(line)["step"] <= step
                except (ValueError, KeyError, TypeError):  # a line cut by the crash
                    ok = False
                if ok:
                    kept.append(line)
                else:
                    dropped += 1
        if dropped:
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.metrics_path)
            log.info(
                "metrics: dropped %d record(s) after step %d from %s (logged before the restart; logged again now)",
                dropped,
                step,
                self.metrics_path,
            )
        self._metrics = open(self.metrics_path, "a")  # noqa: SIM115  (open for the run, closed in close())

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.time()
        record = {"step": step, "time": round(now - self.t0, 3), **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None and step >= self._wandb_from:  # W&B holds earlier steps already
            try:
                self.wandb.log(metrics, step=step)
                self._wandb_from = step + 1
            except Exception as exc:  # noqa: BLE001  (W&B never stops training)
                log.warning("W&B: log failed (%s); continuing without W&B", exc)
                self.wandb = None
        self._tokens += metrics.get("tokens", 0)
        if step % self.cfg.log_every == 0 or step == self.total:
            done = step - self.start_step
            rate = (now - self.t0) / max(done, 1)
            eta = rate * (self.total - step)
            tps = self._tokens / max(now - self._last_log_time, 1e-9)
            self._last_log_time, self._tokens = now, 0
            extra = "".join(f" | {k} {metrics[k]:.3g}" for k in ("grad_norm", "lr") if k in metrics)
            log.info(
                "step %d/%d | loss %.4f%s | tok/s %s | elapsed %s | ETA %s%s",
                step,
                self.total,
                metrics.get("loss", float("nan")),
                extra,
                f"{tps:,.0f}",
                _fmt_time(now - self.t0),
                _fmt_time(eta),
                " | SKIPPED (non-finite)" if metrics.get("skipped") else "",
            )

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.wandb is not None:
            try:
                self.wandb.summary.update(summary)
            except Exception as exc:  # noqa: BLE001  (W&B never stops training)
                log.warning("W&B: summary update failed (%s)", exc)

    def close(self) -> None:
        self._metrics.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:  # noqa: BLE001  (W&B never stops training)
                log.warning("W&B: finish failed (%s)", exc)


def _reset_wandb(wandb) -> None:
    """End this process's W&B service, so a later init may reuse the run id."""
    try:
        wandb.teardown()
    except Exception as exc:  # noqa: BLE001
        log.debug("W&B: teardown failed (%s)", exc)
