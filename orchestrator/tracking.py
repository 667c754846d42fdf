"""Run tracking: console progress, a metrics JSONL in the run dir, and W&B.

W&B mode `auto` logs online when an API key is configured and offline otherwise (sync
later with `wandb sync <run dir>/wandb/offline-run-*`). A W&B failure never stops
training: init falls back to offline, then to none; a failing `log` warns once. The W&B
run id is kept in the run dir, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger("orchestrator")


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
    def __init__(self, cfg, run_dir: Path, config_dict: Dict[str, Any], total_steps: int, start_step: int):
        self.cfg = cfg.logger
        self.run_dir = run_dir
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self._last_log_time, self._tokens = self.t0, 0
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = open(self.metrics_path, "a")
        self.wandb = None
        self.wandb_dir: Optional[str] = None
        if self.cfg.wandb and self.cfg.mode != "disabled":
            self._init_wandb(cfg, config_dict)

    def _init_wandb(self, cfg, config_dict: Dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("W&B: wandb is not installed; logging to console and %s only", self.metrics_path)
            return
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = _wandb_mode(self.cfg.mode)
        for attempt in [mode] + (["offline"] if mode == "online" else []):
            try:
                self.wandb = wandb.init(
                    project=self.cfg.project, entity=self.cfg.entity, name=cfg.run.name, id=run_id,
                    resume="allow", dir=str(self.run_dir), config=config_dict, tags=list(self.cfg.tags),
                    mode=attempt, settings=wandb.Settings(silent=True, init_timeout=90))
                self.wandb_dir = str(Path(self.wandb.dir).parent)
                if attempt == "offline":
                    log.info("W&B: offline (no API key or no network); sync later with `wandb sync %s`",
                             self.wandb_dir)
                return
            except Exception as exc:  # network, auth, service start: none may stop training
                log.warning("W&B: init in %s mode failed (%s: %s)", attempt, type(exc).__name__, exc)
        log.warning("W&B: disabled for this run; metrics are still in %s", self.metrics_path)

    def log_step(self, step: int, metrics: Dict[str, Any]) -> None:
        now = time.time()
        record = {"step": step, "time": round(now - self.t0, 3), **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as exc:
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
            log.info("step %d/%d | loss %.4f%s | tok/s %s | elapsed %s | ETA %s%s", step, self.total,
                     metrics.get("loss", float("nan")), extra, f"{tps:,.0f}", _fmt_time(now - self.t0),
                     _fmt_time(eta), " | SKIPPED (non-finite)" if metrics.get("skipped") else "")

    def log_summary(self, summary: Dict[str, Any]) -> None:
        if self.wandb is not None:
            try:
                self.wandb.summary.update(summary)
            except Exception as exc:
                log.warning("W&B: summary update failed (%s)", exc)

    def close(self) -> None:
        self._metrics.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:
                log.warning("W&B: finish failed (%s)", exc)
