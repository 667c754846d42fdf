"""The driver: the single controller of a run.

It owns the data position, the checkpoint directory and the logs; worker actors own
model shards, one worker group per role the stage declares. The loop: stage.step ->
log -> checkpointer.maybe_save. Stages, methods, roles and engines plug in as objects;
the loop has no per-stage branches. A dead worker is recovered in the job (`_recover`):
every group is rebuilt and reloaded from the last complete checkpoint. That includes a
dead rollout worker (its calls raise `WorkerError` too): the stage closes its rollout
group with the rest and its `setup` starts a new one and syncs the restored weights.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from orchestrator.checkpoint import Checkpoint
from orchestrator.checkpointer import Checkpointer
from orchestrator.errors import ConfigError, OrchestratorError, WorkerError, WorkerOOMError
from orchestrator.models import build_tokenizer, model_config
from orchestrator.roles import POLICY, Roles
from orchestrator.run_config import record_config
from orchestrator.runlock import RunDirLock
from orchestrator.stages import STAGES
from orchestrator.tracking import Tracker, summary_lines
from orchestrator.workers.group import WorkerGroup, call_timeout
from orchestrator.workers.train_worker import TrainWorker

log = logging.getLogger("orchestrator")

PREEMPTED_EXIT = 143  # 128 + SIGTERM: schedulers treat it as "killed by signal", requeue-able
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(OrchestratorError):
    """Stopped by a signal after checkpointing: exit 128 + the signal (130 for Ctrl-C,
    143 for SIGTERM; SIGUSR1, a scheduler's warning, exits 143 so that it requeues)."""

    exit_code = PREEMPTED_EXIT
    report_prefix = "stopped"
    """A planned stop, not a failure: reported as `stopped by SIGUSR1 ...`, not `error: ...`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum if signum == signal.SIGINT else PREEMPTED_EXIT


def load_callbacks(paths: list[str], cfg) -> list[Any]:
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


def _plan_gpu_run(cfg) -> None:
    """The memory plan of a GPU run before any worker starts, as the launchers run it before
    they submit: a run that cannot fit stops here (plan.enforce=false goes on)."""
    from orchestrator.plan import preflight

    try:
        preflight(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # the plan advises; a failure to estimate must not stop a run
        log.warning("memory plan skipped (%s: %s)", type(exc).__name__, exc)


def _predicted_peak(cfg) -> int | None:
    """The plan's peak bytes per device of the policy's workers: its model state, activations
    and logits, without CUDA context, NCCL or fragmentation headroom (which
    `torch.cuda.max_memory_allocated` does not count either). None when the plan fails."""
    from orchestrator.plan import estimate

    try:
        return sum(c.bytes for c in estimate(cfg).components if c.role == "policy" and c.where == "device")
    except Exception as exc:  # noqa: BLE001 (the plan advises; a failure to estimate must not stop a run)
        log.warning("memory: no prediction (%s: %s)", type(exc).__name__, exc)
        return None


def _log_memory(roles: Roles, gpu: bool, predicted: int | None, metrics: dict[str, Any]) -> None:
    """After the first step: the plan's predicted peak per device against the largest peak a
    policy rank measured, as one log line and as metrics of that step."""
    from orchestrator.plan import fmt_bytes

    try:
        peaks = [p for p in roles.policy.call("memory_peak") if p is not None]
    except Exception as exc:  # noqa: BLE001 (a report only: never stop the run for it)
        log.warning("memory: measured peak not read (%s: %s)", type(exc).__name__, exc)
        peaks = []
    measured = max(peaks) if peaks else None
    pred = fmt_bytes(predicted) if predicted is not None else "n/a"
    if measured is None:
        meas = "n/a" if gpu else "n/a on CPU (no allocator peak counter)"
    else:
        meas = fmt_bytes(measured)
        if predicted is not None and measured:
            meas += f" (err {(predicted - measured) / measured:+.1%})"
    log.info("memory: predicted peak %s per device, measured %s", pred, meas)
    if predicted is not None:
        metrics["memory/predicted_peak_gib"] = round(predicted / 2**30, 4)
    if measured is not None:
        metrics["memory/measured_peak_gib"] = round(measured / 2**30, 4)


def start_roles(specs, total: int) -> Roles:
    """One worker group per role spec, colocated ones on their host role's bundles."""
    roles = Roles(specs=dict(specs))
    try:
        for name, spec in specs.items():
            host = roles.groups.get(spec.colocate_with) if spec.colocate_with else None
            roles.groups[name] = WorkerGroup(TrainWorker, spec, colocate=host)
        for name, group in roles.groups.items():
            counts = group.call("build", total)[0]
            spec = specs[name]
            log.info(
                "%s: model %s, method %s: %s trainable of %s parameters (%.2f%%)",
                name,
                spec.model.name,
                spec.method.name,
                f"{counts['params_trainable']:,}",
                f"{counts['params_total']:,}",
                100 * counts["params_trainable"] / max(counts["params_total"], 1),
            )
            if "base_4bit_bytes" in counts:  # a quantized base (Method.memory_stats)
                mib = {k: v / 2**20 for k, v in counts.items() if k.endswith("_bytes")}
                log.info(
                    "%s: 4-bit base %.2f MiB, %.2f MiB of it on rank 0 of %d (in bf16: %.2f MiB, fp32: %.2f MiB)",
                    name,
                    mib["base_4bit_bytes"],
                    mib["base_4bit_rank_bytes"],
                    group.world_size,
                    mib["base_bf16_bytes"],
                    mib["base_fp32_bytes"],
                )
    except BaseException:
        roles.shutdown()
        raise
    return roles


class Driver:
    def __init__(self, cfg, choices: dict[str, str] | None = None):
        self.cfg = cfg
        self.choices = choices or {}
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.ckpt_dir = Path(cfg.checkpoint.dir).resolve() if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self._stop_signal: int | None = None
        self.roles: Roles | None = None
        """The live worker groups (replaced on in-job recovery); callbacks may read them."""
        self.stage = None
        """The stage being run (its rollout group, for RL stages, is rebuilt on recovery too)."""

    @property
    def workers(self) -> WorkerGroup | None:
        """The policy's worker group."""
        return self.roles.policy if self.roles is not None else None

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        log.warning(
            "received %s: checkpointing after the current step, then exiting%s", signal.Signals(signum).name, hint
        )
        self._stop_signal = signum

    def _start(self, stage, ckpt: Checkpointer, latest: Optional[Checkpoint], total: int, initial) -> int:
        """Fresh worker groups holding the model at `latest` (or at its initial state); the step."""
        self.roles = start_roles(stage.roles(), total)
        try:
            if latest is None:
                stage.load_state_dict(initial)
                return 0
            ckpt.load(self.roles, latest)
            stage.load_state_dict(latest.meta["stage"])
            log.info("resumed from %s (step %d of %d)", latest.path, latest.step, total)
            return latest.step
        except BaseException:
            self.roles.shutdown()
            raise

    def _recover(
        self, exc: WorkerError, stage, ckpt: Checkpointer, step: int, total: int, initial, restarts: int
    ) -> int:
        """Rebuild every worker group from the last complete checkpoint; the step to go on from."""
        ckpt.abort_pending()  # its writers are gone: never commit it
        if isinstance(exc, WorkerOOMError):
            raise exc
        if restarts > self.cfg.run.max_restarts:
            raise WorkerError(
                f"{exc}. No restarts left (run.max_restarts={self.cfg.run.max_restarts}); "
                "run the same command again to resume from the last checkpoint."
            ) from exc
        latest = ckpt.latest()
        log.warning(
            "worker failure at step %d: %s. Restart %d/%d from %s",
            step,
            exc,
            restarts,
            self.cfg.run.max_restarts,
            latest.path if latest else "the start (no checkpoint yet)",
        )
        stage.close()
        self.roles.shutdown()
        return self._start(stage, ckpt, latest, total, initial)

    def _prepare(self):
        """Everything before any worker starts: tokenizer, stage, resume point, the config record."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.cluster.gpus_per_worker:
            _plan_gpu_run(cfg)
        config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
        tokenizer = build_tokenizer(cfg.model)
        model_config(cfg.model)  # fail here, not in every worker, if the model is unreachable
        stage = STAGES[cfg.stage.name](cfg, tokenizer)
        meta = {"world_size": cfg.cluster.num_workers, "choices": self.choices, "total_steps": stage.total_steps}
        ckpt = Checkpointer(self.ckpt_dir, cfg.checkpoint, lambda: {"stage": stage.state_dict(), **meta})
        latest = ckpt.resume_point()
        record_config(self.run_dir, config_dict, resuming=latest is not None)
        if latest is not None and latest.meta.get("total_steps") not in (None, stage.total_steps):
            log.info(
                "the run now ends at step %d (was %d): the LR schedule continues from step %d along the new length",
                stage.total_steps,
                latest.meta["total_steps"],
                latest.step,
            )
        return config_dict, tokenizer, stage, ckpt, latest

    def run(self) -> dict[str, Any]:
        """The run, holding the run directory's lock (a second run into it refuses to start);
        with run.eval_after, then the evaluation of its export (orchestrator/evals/after.py)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunDirLock(self.run_dir):
            summary = self._run()
            if self.cfg.run.eval_after:
                from orchestrator.evals.after import evaluate_after

                summary = evaluate_after(self.cfg, self.choices, summary)
            return summary

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        config_dict, tokenizer, stage, ckpt, latest = self._prepare()
        self.stage = stage
        total = stage.total_steps
        callbacks = load_callbacks(cfg.run.callbacks, cfg)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        initial = stage.state_dict()
        tracker, restarts = None, 0
        try:
            start = self._start(stage, ckpt, latest, total, initial)
            for cb in callbacks:
                if hasattr(cb, "on_start"):
                    cb.on_start(self)
            tracker = Tracker(cfg, self.run_dir, config_dict, total, start)
            stage.setup(self.roles, start, tracker)
            metrics: dict[str, Any] = {}
            step = start
            predicted, memory_logged = _predicted_peak(cfg), False
            while step < total:
                try:
                    step += 1
                    with call_timeout(cfg.run.step_timeout_s):
                        metrics = stage.step(self.roles, step)
                    if not memory_logged:  # the first step has built the optimizer state: its peak
                        memory_logged = True
                        _log_memory(self.roles, cfg.cluster.gpus_per_worker > 0, predicted, metrics)
                    tracker.log_step(step, metrics)
                    for cb in callbacks:
                        cb.on_step_end(step, metrics)
                    ckpt.maybe_save(self.roles, step, total, stopping=self._stop_signal is not None)
                except WorkerError as exc:
                    restarts += 1
                    step = self._recover(exc, stage, ckpt, step, total, initial, restarts)
                    tracker.rewind(step)  # the steps after the checkpoint are trained and logged again
                    stage.setup(self.roles, step, tracker)
                    continue
                if self._stop_signal is not None:
                    name = signal.Signals(self._stop_signal).name
                    then = (
                        "the job script requeues or ends the job"
                        if os.environ.get("SLURM_JOB_ID")
                        else "run the same command again to resume"
                    )
                    raise Preempted(f"by {name} at step {step}; checkpoint {ckpt.last}; {then}.", self._stop_signal)
            ckpt.commit_pending(self.roles, wait=True)
            summary = self._finish(stage, ckpt, tracker, tokenizer, total, start, restarts, metrics)
            self._print_summary(summary)
            return summary
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            stage.close()
            if tracker is not None:
                tracker.close()
            if self.roles is not None:
                self.roles.shutdown()

    def _finish(
        self,
        stage,
        ckpt: Checkpointer,
        tracker,
        tokenizer,
        total: int,
        start: int,
        restarts: int,
        metrics: dict[str, Any],
    ) -> dict[str, Any]:
        """Export, write summary.json and log the summary numbers."""
        exports: dict[str, str] = {}
        if self.cfg.checkpoint.export_hf and POLICY in self.roles.trained():  # a frozen-only stage exports nothing
            t = time.time()
            exports = self.roles.policy.call("export_hf", str(self.run_dir / "export"), tokenizer)[0]
            log.info("exported %s (%.1fs)", ", ".join(f"{k}: {v}" for k, v in exports.items()), time.time() - t)
            self._write_model_cards(exports)
        summary = {
            "steps": total,
            "resumed_from": start,
            "restarts": restarts,
            "final_loss": metrics.get("loss"),
            "run_dir": str(self.run_dir),
            "checkpoint": str(ckpt.last) if ckpt.last else None,
            "exports": exports,
            "metrics": str(tracker.metrics_path),
            "log": str(self.run_dir / "train.log"),
            "wandb": tracker.wandb_dir,
            "workers": next(iter(self.roles.groups.values())).nodes if self.roles.groups else [],
            **stage.summary(),
        }
        summary.update(tracker.finish(summary))  # charts; numbers, export, eval report to the trackers
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _write_model_cards(self, exports: dict[str, str]) -> None:
        """The model card (README.md) in every exported model directory (orchestrator/evals/card.py)."""
        import yaml

        from orchestrator.evals.card import write_export_cards

        try:
            recorded = yaml.safe_load((self.run_dir / "config.yaml").read_text())
            written = write_export_cards(self.cfg, self.run_dir, recorded, exports)
        except Exception as exc:  # noqa: BLE001  (the exports are complete without their card)
            log.warning("model card not written: %s: %s", type(exc).__name__, exc)
            return
        if written:
            log.info("model card: %s", ", ".join(written))

    @staticmethod
    def _print_summary(s: dict[str, Any]) -> None:
        lines = [
            f"run complete: {s['steps']} steps, final loss {s['final_loss']:.4f}"
            if s["final_loss"] is not None
            else f"run complete: {s['steps']} steps",
            f"  run dir:     {s['run_dir']}",
            f"  checkpoint:  {s['checkpoint']}",
        ]
        lines += [f"  export ({k}): {v}" for k, v in s["exports"].items()]
        lines += [f"  {k}: {v}" for k, v in s.items() if k.startswith("eval_")]
        lines += [f"  metrics:     {s['metrics']}", f"  log:         {s['log']}"]
        lines += summary_lines(s)  # each tracker's run, and the charts
        log.info("\n".join(lines))
