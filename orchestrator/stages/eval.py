"""Evaluation stage: the candidate against its base on the same items; statistics, gate, report.

`python -m orchestrator stage=eval eval.candidate=<run dir or model> [eval.base=<model>]
[eval.tasks=[...]]`. Nothing trains: the stage declares two frozen roles, `candidate` and
`base` (the base colocated on the candidate's bundles), only when a task needs token
log-probs (nll, choice), and generates through the rollout engine (`rollout` group), one
model at a time. Before anything is scored, the items of every task are looked for in the
candidate's training data (orchestrator/evals/contamination.py, eval.on_contamination).
One step per task scores both models on it; the per-item scores are the stage's state,
so a checkpointed eval resumes after its last finished task (results are reused only for
the same models and the same items). At the end (`summary`) every metric gets intervals
and a paired test (orchestrator/evals/gate.py), the gate decides PROMOTE or REJECT, and
the report, the model card and, on PROMOTE, a `promoted` link to the candidate's weights
are written into this run's directory, which may not be the
candidate's run directory or lie inside its weights.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from orchestrator.algos.eval_stats import ratio
from orchestrator.config.schema import FullMethodConfig
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.evals import report as reports
from orchestrator.evals.card import model_card
from orchestrator.evals.contamination import measure as measure_contamination
from orchestrator.evals.gate import Decision, StatSettings, decide, default_rules, resolve_metric
from orchestrator.evals.models import EvalModel, resolve_pair
from orchestrator.evals.tasks import EvalTask, MetricScores, build_tasks
from orchestrator.evaluation import ModelScorer
from orchestrator.roles import RoleSpec
from orchestrator.stages.base import Stage

log = logging.getLogger("orchestrator")

CANDIDATE, BASE = "candidate", "base"
BASE_GPU_SHARE = 0.35
"""Share of a bundle's GPU the colocated base takes (the candidate the rest, less a colocated
rollout engine's share)."""


class GateRejected(OrchestratorError):
    """The gate decided REJECT and eval.fail_on_reject is set."""

    exit_code = 3


class EvalStage(Stage):
    uses_rollout = True

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.candidate, self.base = resolve_pair(cfg, self.run_dir)
        _check_own_dir(self.run_dir, self.candidate)
        self.tasks: list[EvalTask] = build_tasks(cfg, self.candidate.training_data())
        self.contamination = measure_contamination(cfg, self.tasks, self.candidate.training_data())
        available = {f"{t.name}/{m}": hib for t in self.tasks for m, hib in t.metrics().items()}
        rules = list(cfg.eval.gate) or default_rules(f"{self.tasks[0].name}/{next(iter(self.tasks[0].metrics()))}")
        self.rules = [(resolve_metric(r.metric, available, f"eval.gate[{i}]"), r) for i, r in enumerate(rules)]
        self.results: dict[str, dict[str, dict[str, MetricScores]]] = {}
        self.scorers: dict[str, ModelScorer] = {}
        self.tracker = None
        self._pg = None
        log.info(
            "eval: candidate %s vs base %s on %s",
            self.candidate.weights,
            self.base.weights,
            ", ".join(f"{t.name} ({len(t.items)} items)" for t in self.tasks),
        )

    # ------------------------------------------------------------- roles
    def roles(self) -> dict[str, RoleSpec]:
        """Frozen `candidate` and `base` roles when a task needs log-probs; none otherwise."""
        if not any(t.needs_logprobs for t in self.tasks):
            return {}
        from orchestrator.rollout.base import COLOCATED_GPU_SHARE

        gpu = bool(self.cfg.cluster.gpus_per_worker)
        rollout = COLOCATED_GPU_SHARE if self.cfg.rollout.placement == "colocated" else 0.0
        cand = self._frozen(CANDIDATE, self.candidate, None, 1.0 - BASE_GPU_SHARE - rollout if gpu else 1.0)
        return {CANDIDATE: cand, BASE: self._frozen(BASE, self.base, CANDIDATE, BASE_GPU_SHARE if gpu else 0.0)}

    def _frozen(self, name: str, model: EvalModel, colocate: str | None, share: float) -> RoleSpec:
        from orchestrator.methods.full import Full

        c = self.cfg
        return RoleSpec(
            name=name,
            model=model.spec,
            method=FullMethodConfig(),
            method_cls=Full,
            backend=c.backend,
            cluster=c.cluster,
            colocate_with=colocate,
            gpu_share=share,
            seed=c.train.seed,
            logits_chunk_mb=c.train.logits_chunk_mb,
            kernels=str(c.train.kernels),
            compile=c.train.compile,
        )

    @property
    def total_steps(self) -> int:
        return len(self.tasks)

    # ---------------------------------------------------------- lifecycle
    def setup(self, roles, start_step: int, tracker) -> None:
        from orchestrator.models import build_tokenizer, model_config

        self._close_scorers()
        self.tracker = tracker
        for m in (self.candidate, self.base):
            tok = build_tokenizer(m.spec)
            group = roles[m.role] if m.role in roles else None
            self.scorers[m.role] = ModelScorer(
                m.role, tok, lambda m=m, tok=tok: self._rollout(m, tok), group, self.cfg.train.micro_batch_size
            )
            self.scorers[m.role].max_length = getattr(model_config(m.spec), "max_position_embeddings", None)
        self._pg = roles[CANDIDATE].pg if CANDIDATE in roles else None

    def _rollout(self, model: EvalModel, tokenizer):
        """A rollout group serving `model`; the other model's is shut down first (one at a time)."""
        from orchestrator.rollout.group import RolloutGroup

        for role, scorer in self.scorers.items():
            if role != model.role:
                scorer.close()
        return RolloutGroup(self.cfg.rollout, model.spec, tokenizer, self.cfg.cluster, train_pg=self._pg)

    def _close_scorers(self) -> None:
        for scorer in self.scorers.values():
            scorer.close()
        self.scorers = {}

    def close(self) -> None:
        self._close_scorers()

    def state_dict(self) -> dict[str, Any]:
        return {
            "results": {
                key: {who: {m: vars(s) for m, s in per.items()} for who, per in res.items()}
                for key, res in self.results.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.results = {
            key: {who: {m: MetricScores(**s) for m, s in per.items()} for who, per in res.items()}
            for key, res in state.get("results", {}).items()
        }

    # -------------------------------------------------------------- steps
    def _key(self, task: EvalTask) -> str:
        """What a task's results depend on: the two models and the task with its items."""
        what = [self.candidate.weights, self.base.weights, task.describe()]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _scores(self, task: EvalTask) -> dict[str, dict[str, MetricScores]]:
        key = self._key(task)
        if key not in self.results:
            self.results[key] = {who: task.score(self.scorers[who]) for who in (CANDIDATE, BASE)}
        return self.results[key]

    def step(self, roles, step: int) -> dict[str, Any]:
        task = self.tasks[step - 1]
        res = self._scores(task)
        metrics = {f"{task.name}/{m}/{who}": ratio(s.x, s.w) for who, per in res.items() for m, s in per.items()}
        log.info(
            "eval %s: %s",
            task.name,
            "; ".join(
                f"{m} {metrics[f'{task.name}/{m}/candidate']:.4g} vs {metrics[f'{task.name}/{m}/base']:.4g}"
                for m in res[CANDIDATE]
            ),
        )
        return metrics

    # ------------------------------------------------------------- report
    def report(self) -> tuple[dict[str, Any], Decision]:
        """Compare every metric, apply the gate; the report's content and the decision."""
        e = self.cfg.eval
        s = StatSettings(e.confidence, e.bootstrap_resamples, e.permutation_resamples, e.seed)
        comps = []
        for task in self.tasks:
            res = self._scores(task)  # also scores a task a resumed run has not reached
            comps.extend(task.compare(res[CANDIDATE], res[BASE], s))
        decision = decide({c.key: c for c in comps}, self.rules, e.alpha)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return reports.build_report(self, comps, decision, date), decision

    def summary(self) -> dict[str, Any]:
        report, decision = self.report()
        paths = reports.write(report, self.run_dir)
        card = self.run_dir / "README.md"
        card.write_text(model_card(report, self.candidate, self.cfg.eval))
        reports.log_to_tracker(self.tracker, report)
        promoted = _record_promotion(self.run_dir, self.candidate, decision.promote)
        log.info("eval gate: %s\n%s", decision.verdict, "\n".join(reports.gate_lines(report)[2:]))
        out = {
            "eval_decision": decision.verdict,
            "eval_report": paths["markdown"],
            "eval_report_json": paths["json"],
            "eval_model_card": str(card),
            **({"eval_promoted": promoted} if promoted else {}),
        }
        if self.cfg.eval.fail_on_reject and not decision.promote:
            raise GateRejected(f"the gate decided REJECT (eval.fail_on_reject=true); report: {paths['markdown']}")
        return out


def _check_own_dir(run_dir: Path, candidate: EvalModel) -> None:
    """An eval writes into its own run directory only: not the candidate's run dir, not its weights."""
    weights = Path(candidate.spec.pretrained).resolve() if candidate.spec.pretrained else None
    inside = weights is not None and weights.is_dir() and (run_dir == weights or weights in run_dir.parents)
    if run_dir == candidate.run_dir or inside:
        raise ConfigError(
            f"run.output_dir={str(run_dir)!r} is the candidate's own {'run' if not inside else 'model'} directory; "
            "an eval writes its report, model card and checkpoints into a directory of its own: set run.name or "
            "run.output_dir (e.g. run.output_dir=<candidate run dir>/eval)"
        )


def _record_promotion(run_dir: Path, candidate: EvalModel, promote: bool) -> str | None:
    """On PROMOTE, `<run dir>/promoted`: a link to the candidate's weights (and promoted.json
    naming them); on REJECT, any earlier record is removed."""
    link, record = run_dir / "promoted", run_dir / "promoted.json"
    for p in (link, record):
        if p.is_symlink() or p.exists():
            p.unlink()
    if not promote:
        return None
    weights = candidate.spec.pretrained
    record.write_text(json.dumps({"weights": candidate.weights, "ref": candidate.ref}, indent=1) + "\n")
    if weights and Path(weights).is_dir():
        os.symlink(Path(weights).resolve(), link, target_is_directory=True)
        return str(link)
    return str(record)
