"""W&B: metrics, sample tables, the summary, and the export as a model artifact.

Mode `auto` logs online when an API key is configured and offline otherwise (sync later
with `wandb sync <run dir>/wandb/offline-run-*`). The online attempt is bounded
(`logger.timeout_s`, one line while it waits), then init falls back to offline (same run id,
after resetting the W&B service the failed attempt left holding it; a new id if that still
fails), then to none. The run id is kept in `<run dir>/wandb_run_id`, so a resumed run
continues the same W&B run. W&B's step only increases: a resumed run skips the steps the
W&B run already holds (identical values on a deterministic resume); W&B's "rewind"
(`resume_from=run?_step=N`) is a private preview, not used.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional

from orchestrator.tracking.base import RunOutputs, Sink, bounded, first_line

log = logging.getLogger("orchestrator")


def wandb_mode(requested: str) -> str:
    """online | offline | disabled for `logger.mode` (auto: online with an API key)."""
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


def _reset_wandb(wandb) -> None:
    """End this process's W&B service, so a later init may reuse the run id."""
    try:
        wandb.teardown()
    except Exception as exc:  # noqa: BLE001
        log.debug("W&B: teardown failed (%s)", exc)


def artifact_name(text: str) -> str:
    """A W&B artifact name (letters, digits, dashes, underscores, dots)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


class WandbSink(Sink):
    name = "W&B"

    def __init__(self, run, run_name: str, timeout_s: float):
        self.run = run
        self.run_name = run_name
        self.timeout_s = timeout_s
        self.dir = str(Path(run.dir).parent)
        self._from = int(getattr(run, "step", 0) or 0)  # the first step the W&B run does not hold yet

    @classmethod
    def open(cls, logger_cfg, run_name: str, run_dir: Path, config_dict: dict[str, Any]) -> Optional[WandbSink]:
        """The W&B run (online, then offline, then none), or None."""
        try:
            import wandb
        except ImportError:
            log.warning("W&B: wandb is not installed; not logging to W&B")
            return None
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = str(wandb_mode(str(logger_cfg.mode)))
        attempts = [(mode, run_id)] + ([("offline", run_id), ("offline", None)] if mode == "online" else [])
        for attempt, attempt_id in attempts:
            attempt_id = attempt_id or uuid.uuid4().hex[:12]
            run = _init(wandb, logger_cfg, run_name, run_dir, config_dict, attempt, attempt_id)
            if run is None:
                continue
            if attempt_id != run_id:
                id_file.write_text(attempt_id)
            sink = cls(run, run_name, logger_cfg.timeout_s)
            if attempt == "offline":
                why = "no API key" if mode == "offline" else "online init failed"
                log.info("W&B: offline (%s); sync later with `wandb sync %s`", why, sink.dir)
            return sink
        log.warning("W&B: disabled for this run; metrics are still in %s", run_dir / "metrics.jsonl")
        return None

    def where(self) -> Optional[str]:
        return self.dir if self.run.offline else f"{self.run.url} ({self.dir})"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self._from:  # W&B holds earlier steps already
            self.run.log(metrics, step=step)
            self._from = step + 1

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: Optional[int]) -> None:
        import wandb

        table = wandb.Table(columns=columns, data=rows)
        if step is None:
            self.run.log({key: table})
        elif step >= self._from - 1:  # a table of the step being logged, or of the next one
            self.run.log({key: table}, step=step)

    def log_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def log_outputs(self, outputs: RunOutputs) -> None:
        import wandb

        for kind, path in outputs.exports.items():
            art = wandb.Artifact(artifact_name(f"{self.run_name}-{kind}"), type="model", metadata={"kind": kind})
            art.add_dir(str(path))
            self.run.log_artifact(art)
            log.info("W&B: logged %s as artifact %s", path, art.name)
        if outputs.eval_files:
            art = wandb.Artifact(artifact_name(f"{self.run_name}-eval-report"), type="evaluation")
            for f in outputs.eval_files:
                art.add_file(str(f))
            self.run.log_artifact(art)

    def close(self, finished: bool) -> None:
        if not bounded(lambda: self.run.finish(exit_code=0 if finished else 1), 2 * self.timeout_s):
            log.warning(
                "W&B: finish did not complete within %.0fs; its files are in %s (`wandb sync %s`)",
                2 * self.timeout_s,
                self.dir,
                self.dir,
            )


def _init(wandb, logger_cfg, run_name: str, run_dir: Path, config_dict: dict[str, Any], mode: str, run_id: str):
    """One `wandb.init` attempt in `mode`; the run, or None (said in one line)."""
    timeout = logger_cfg.timeout_s
    if mode == "online":
        log.info(
            "W&B: connecting to %s (up to %gs; then offline) ...",
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"),
            timeout,
        )
    try:
        return wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.wandb.entity,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config_dict,
            tags=list(logger_cfg.tags),
            mode=mode,
            settings=wandb.Settings(silent=True, init_timeout=timeout),
        )
    except Exception as exc:  # noqa: BLE001  (network, auth, service start: none may stop training)
        log.warning("W&B: init in %s mode failed (%s)", mode, first_line(exc))
        if mode == "online":
            _reset_wandb(wandb)  # the failed attempt keeps the run id busy in this process
        return None
