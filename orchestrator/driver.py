"""The driver: the single controller of a run.

It owns the data position, the checkpoint directory and the logs; worker actors own
model shards. The loop: next batch -> train step on every rank -> log -> checkpoint.
Stages and methods plug in as objects; the loop has no per-stage branches.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from orchestrator.checkpoint import CheckpointManager
from orchestrator.errors import CheckpointError, OrchestratorError, WorkerError
from orchestrator.models import build_tokenizer, model_config
from orchestrator.stages import STAGES
from orchestrator.tracking import Tracker
from orchestrator.workers.group import WorkerGroup
from orchestrator.workers.train_worker import TrainWorker

log = logging.getLogger("orchestrator")

PREEMPTED_EXIT = 143  # 128 + SIGTERM: schedulers treat it as "killed by signal", requeue-able


class Preempted(OrchestratorError):
    exit_code = PREEMPTED_EXIT


def load_callbacks(paths: List[str], cfg) -> List[Any]:
    """Callbacks: classes (built with the config) or objects with `on_step_end(step, metrics)`
    and optionally `on_start(driver)` (called once the workers are up)."""
    out = []
    for path in paths:
        mod, _, attr = path.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise OrchestratorError(f"run.callbacks: cannot import {path!r} ({exc})") from exc
        out.append(obj(cfg) if isinstance(obj, type) else obj)
    return out


class Driver:
    def __init__(self, cfg, choices: Dict[str, str] | None = None):
        self.cfg = cfg
        self.choices = choices or {}
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.ckpt_dir = Path(cfg.checkpoint.dir).resolve() if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self._stop_signal: int | None = None
        self._pending: Optional[Tuple[int, Dict[str, Any], float]] = None  # background save: step, meta, start
        self.workers: WorkerGroup | None = None
        """The live worker group (replaced on in-job recovery); callbacks may read it."""

    # ------------------------------------------------------------------ helpers
    def _on_signal(self, signum, _frame) -> None:
        log.warning("received %s: checkpointing after the current step, then exiting",
                    signal.Signals(signum).name)
        self._stop_signal = signum

    def _resume_point(self, ckpts: CheckpointManager):
        latest = ckpts.latest()
        mode = self.cfg.checkpoint.resume
        if mode == "must" and latest is None:
            raise CheckpointError(f"checkpoint.resume=must but no complete checkpoint in {self.ckpt_dir}. "
                                  "Use checkpoint.resume=auto to start fresh when none exists.")
        if mode == "never" and latest is not None:
            raise CheckpointError(
                f"checkpoint.resume=never but {self.ckpt_dir} already holds checkpoints (latest: step "
                f"{latest.step}); refusing to overwrite them. Use another run.output_dir / run.name, or "
                "checkpoint.resume=auto to continue.")
        return latest

    def _save(self, ckpts: CheckpointManager, workers: WorkerGroup, stage, step: int, blocking: bool = True):
        """Save at `step`. Blocking: returns the committed path. Otherwise the workers write in
        the background and `_commit_pending` commits the directory once they are done."""
        t = time.time()
        meta = {"stage": stage.state_dict(), "world_size": workers.world_size, "choices": self.choices}
        if blocking:
            path = ckpts.save(step, lambda d: workers.call("save", d), meta)
            log.info("checkpoint step %d -> %s (%.1fs)", step, path, time.time() - t)
            return path
        ckpts.write(step, lambda d: workers.call("save", d, False))
        self._pending = (step, copy.deepcopy(meta), t)  # the stage moves on before the commit
        log.info("checkpoint step %d: state copied in %.2fs, writing in the background", step, time.time() - t)
        return None

    def _commit_pending(self, ckpts: CheckpointManager, workers: WorkerGroup, wait: bool) -> Optional[Path]:
        """Commit the background save once every rank has written its part (wait: block)."""
        if self._pending is None:
            return None
        step, meta, t = self._pending
        try:
            if not all(workers.call("save_done", wait)):
                return None
        except BaseException as exc:
            self._pending = None
            ckpts.abort(step, exc)
            raise
        self._pending = None
        path = ckpts.commit(step, meta)
        log.info("checkpoint step %d -> %s (written in the background, %.1fs after the save began)",
                 step, path, time.time() - t)
        return path

    def _start_workers(self, stage, latest, total: int, initial_stage_state) -> Tuple[WorkerGroup, int]:
        """A fresh worker group holding the model at `latest` (or at its initial state)."""
        cfg = self.cfg
        workers = self.workers = WorkerGroup(TrainWorker, cfg, gpu_share=stage.train_gpu_share)
        try:
            counts = workers.call("build", total)[0]
            log.info("model %s, method %s: %s trainable of %s parameters (%.2f%%)", cfg.model.name,
                     cfg.method.name, f"{counts['params_trainable']:,}", f"{counts['params_total']:,}",
                     100 * counts["params_trainable"] / counts["params_total"])
            if latest is None:
                stage.load_state_dict(initial_stage_state)
                return workers, 0
            workers.call("load", str(latest.path))
            stage.load_state_dict(latest.meta["stage"])
            log.info("resumed from %s (step %d of %d)", latest.path, latest.step, total)
            return workers, latest.step
        except BaseException:
            workers.shutdown()
            raise

    # ---------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config_dict))

        tokenizer = build_tokenizer(cfg.model)
        model_config(cfg.model)  # fail here, not in every worker, if the model is unreachable
        stage = STAGES[cfg.stage.name](cfg, tokenizer)
        total = stage.total_steps
        ckpts = CheckpointManager(self.ckpt_dir, cfg.checkpoint.keep_last)
        latest = self._resume_point(ckpts)
        callbacks = load_callbacks(cfg.run.callbacks, cfg)

        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        initial_stage_state = stage.state_dict()
        workers, tracker, restarts = None, None, 0
        try:
            workers, start = self._start_workers(stage, latest, total, initial_stage_state)
            for cb in callbacks:
                if hasattr(cb, "on_start"):
                    cb.on_start(self)
            tracker = Tracker(cfg, self.run_dir, config_dict, total, start)
            resumed_from = start
            stage.setup(workers, start, tracker)
            last_ckpt = latest.path if latest else None
            metrics: Dict[str, Any] = {}
            step = start
            while step < total:
                try:
                    step += 1
                    metrics = stage.step(workers, step)
                    tracker.log_step(step, metrics)
                    for cb in callbacks:
                        cb.on_step_end(step, metrics)
                    last_ckpt = self._commit_pending(ckpts, workers, wait=False) or last_ckpt
                    every = cfg.checkpoint.every_steps
                    if (self._stop_signal is not None or (every and step % every == 0)
                            or (step == total and cfg.checkpoint.save_final)):
                        # The last save and a save on a stop signal are written before going on.
                        blocking = not cfg.checkpoint.async_save or self._stop_signal is not None or step == total
                        last_ckpt = self._commit_pending(ckpts, workers, wait=True) or last_ckpt
                        last_ckpt = self._save(ckpts, workers, stage, step, blocking) or last_ckpt
                except WorkerError as exc:
                    if self._pending is not None:  # its writers are gone: never commit it
                        ckpts.abort(self._pending[0])
                        self._pending = None
                    if restarts >= cfg.run.max_restarts:
                        raise WorkerError(f"{exc}. No restarts left (run.max_restarts={cfg.run.max_restarts}); "
                                          "run the same command again to resume from the last checkpoint.") from exc
                    restarts += 1
                    latest = ckpts.latest()
                    log.warning("worker failure at step %d: %s. Restart %d/%d from %s", step, exc, restarts,
                                cfg.run.max_restarts, latest.path if latest else "the start (no checkpoint yet)")
                    stage.close()
                    workers.shutdown()
                    workers, step = self._start_workers(stage, latest, total, initial_stage_state)
                    stage.setup(workers, step, tracker)
                    continue
                if self._stop_signal is not None:
                    raise Preempted(f"stopped by signal {self._stop_signal} at step {step}; checkpoint "
                                    f"{last_ckpt}. Run the same command again to resume.")
            last_ckpt = self._commit_pending(ckpts, workers, wait=True) or last_ckpt
            exports: Dict[str, str] = {}
            if cfg.checkpoint.export_hf:
                t = time.time()
                exports = workers.call("export_hf", str(self.run_dir / "export"), tokenizer)[0]
                log.info("exported %s (%.1fs)", ", ".join(f"{k}: {v}" for k, v in exports.items()),
                         time.time() - t)
            summary = {"steps": total, "resumed_from": resumed_from, "restarts": restarts,
                       "final_loss": metrics.get("loss"),
                       "run_dir": str(self.run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
                       "exports": exports, "metrics": str(tracker.metrics_path),
                       "log": str(self.run_dir / "train.log"), "wandb": tracker.wandb_dir,
                       "workers": workers.nodes, **stage.summary()}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            tracker.log_summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self._print_summary(summary)
            return summary
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            stage.close()
            if tracker is not None:
                tracker.close()
            if workers is not None:
                workers.shutdown()

    @staticmethod
    def _print_summary(s: Dict[str, Any]) -> None:
        lines = [f"run complete: {s['steps']} steps, final loss {s['final_loss']:.4f}"
                 if s["final_loss"] is not None else f"run complete: {s['steps']} steps",
                 f"  run dir:     {s['run_dir']}",
                 f"  checkpoint:  {s['checkpoint']}"]
        lines += [f"  export ({k}): {v}" for k, v in s["exports"].items()]
        lines += [f"  {k}: {v}" for k, v in s.items() if k.startswith("eval_")]
        lines += [f"  metrics:     {s['metrics']}", f"  log:         {s['log']}"]
        if s["wandb"]:
            lines.append(f"  W&B:         {s['wandb']}")
        log.info("\n".join(lines))
