"""Typed schemas of evaluation and promotion (`stage=eval`, `run.eval_after`): the tasks an
eval runs and the gate rules that decide PROMOTE or REJECT, with the checks of their fields.

`EvalConfig` (orchestrator/config/schema.py) holds the lists of these; the `eval` stage
(`EvalStageConfig` there) has no fields of its own: what to evaluate is the `eval` group's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import MISSING

from orchestrator.config.checks import Choice, positive
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config.schema import Config


class EvalTaskKind(Choice):
    """Task kinds (orchestrator/evals/tasks.py: TASKS)."""

    generation = "generation"
    nll = "nll"
    choice = "choice"
    preference = "preference"
    lm_eval = "lm_eval"


class ContaminationAction(Choice):
    """What an eval does when evaluation items occur in the candidate's training data."""

    warn = "warn"
    stop = "stop"
    skip = "skip"


@dataclass
class EvalTaskSpec:
    """One evaluation task, scored on the candidate and on the base with the same items."""

    kind: EvalTaskKind = MISSING
    """generation (sampled and greedy completions scored by `reward`: accuracy, pass@k) | nll
    (per-token NLL and perplexity of reference completions) | choice (multiple choice by
    log-likelihood: rows with `choices` and the `answer` index or text) | preference (win
    rate of the candidate's greedy completions over the base's under `reward`) | lm_eval (a
    task of lm-evaluation-harness, named by `task`)."""
    name: str | None = None
    """Label in the report and in gate rules (`<name>/<metric>`); None: `<kind>_<source>`."""
    source: str | None = None
    """Rows: a .jsonl/.parquet file, `hf:<id>` or `synthetic:<generator>`. None: the held-out
    split of the candidate's training data. A source that is the candidate's training data
    is always read through its held-out split."""
    split: str = "train"
    """Split of an `hf:` source."""
    items: int | None = None
    """Items evaluated (the first ones, in source order); None: eval.items, else eval.samples."""
    samples: int = 1
    """generation: completions sampled per item at `temperature` for pass@k (1: greedy only)."""
    k: list[int] = field(default_factory=lambda: [1])
    """generation: the k of pass@k reported when samples > 1 (each <= samples)."""
    temperature: float = 1.0
    """generation: sampling temperature of the `samples` completions (accuracy is greedy)."""
    reward: str | None = None
    """generation: scores a completion against the item's answer (a built-in or
    `module:function`); None: eval.reward. preference: scores a completion, a built-in
    (called with the completion and the item's answer) or `module:function` called with
    (prompt, completion) -> float; required."""
    max_new_tokens: int | None = None
    """generation: budget per completion; None: eval.max_new_tokens, else rollout.max_new_tokens."""
    task: str | None = None
    """lm_eval: the harness task: a name of its registry (e.g. hellaswag; data from the hub or
    its cache), a task YAML file, or a task shipped with this project (arith_choice,
    arith_exact: offline). Required for lm_eval; its `items` are the first documents."""
    num_fewshot: int | None = None
    """lm_eval: few-shot examples per prompt; None: the task's own setting."""


@dataclass
class GateRule:
    """One condition of the promotion gate. Deltas are candidate - base, signed so that
    positive is better (a lower NLL is an improvement), in the metric's unit unless relative."""

    metric: str = MISSING
    """`<task>/<metric>` (e.g. heldout_gen/pass@1), or a metric name one task alone reports."""
    min_delta: float | None = None
    """The improvement must be at least this (e.g. 0.02 for two accuracy points)."""
    max_regression: float | None = None
    """A guard: the metric may get worse by at most this."""
    significant: bool = False
    """The paired test must reject 'no difference' at eval.alpha (Holm-adjusted over every
    significant rule) with the candidate better."""
    relative: bool = False
    """min_delta / max_regression as a fraction of the base's value."""


def check_eval_stage(cfg: Config) -> None:
    """`stage=eval`: every task gets items."""
    e = cfg.eval
    if not e.items and not e.samples and any(t.items is None for t in e.tasks or [None]):
        raise ConfigError(
            "stage=eval: eval.samples=0 and no eval.items leave tasks without items; set eval.items (items per "
            "task, e.g. 100) or items on every task"
        )


def check_eval(e, cfg: Config) -> None:
    """The evaluation fields of `EvalConfig` (tasks, gate, statistics)."""
    from orchestrator.config.schema import check_reward

    names = [t.name for t in e.tasks if t.name]
    if len(names) != len(set(names)):
        raise ConfigError(f"eval.tasks: task names must be unique (got {names})")
    for i, t in enumerate(e.tasks):
        _check_task(t, f"eval.tasks[{i}]", check_reward)
    for i, r in enumerate(e.gate):
        key = f"eval.gate[{i}]"
        if r.min_delta is None and r.max_regression is None and not r.significant:
            raise ConfigError(
                f"{key} (metric {r.metric!r}) sets no condition: give min_delta, max_regression or significant: true"
            )
        if r.max_regression is not None:
            positive(r.max_regression, f"{key}.max_regression", allow_zero=True)
    if not 0 < e.alpha < 1:
        raise ConfigError(f"eval.alpha={e.alpha} must be in (0, 1), e.g. 0.05")
    if not 0 < e.confidence < 1:
        raise ConfigError(f"eval.confidence={e.confidence} must be in (0, 1), e.g. 0.95")
    positive(e.bootstrap_resamples, "eval.bootstrap_resamples")
    positive(e.permutation_resamples, "eval.permutation_resamples")
    positive(e.contamination_ngram, "eval.contamination_ngram")
    if not 0 < e.contamination_threshold <= 1:
        raise ConfigError(
            f"eval.contamination_threshold={e.contamination_threshold} must be in (0, 1] (the share of an item's "
            "n-grams found in the training data that flags it)"
        )


def _check_task(t: EvalTaskSpec, key: str, check_reward) -> None:
    if t.items is not None:
        positive(t.items, f"{key}.items")
    positive(t.samples, f"{key}.samples")
    if t.temperature < 0:
        raise ConfigError(f"{key}.temperature={t.temperature} must be >= 0")
    if t.max_new_tokens is not None:
        positive(t.max_new_tokens, f"{key}.max_new_tokens")
    if t.kind == EvalTaskKind.generation:
        bad = [k for k in t.k if not 1 <= k <= t.samples]
        if bad:
            raise ConfigError(
                f"{key}.k={list(t.k)}: pass@k needs 1 <= k <= samples ({t.samples}); raise {key}.samples "
                f"to at least {max(t.k)} or drop {bad}"
            )
        if t.samples > 1 and t.temperature == 0:
            raise ConfigError(f"{key}: samples={t.samples} at temperature 0 are identical; set temperature > 0")
    if t.reward is not None:
        check_reward(t.reward, f"{key}.reward")
    if t.kind == EvalTaskKind.lm_eval and not t.task:
        raise ConfigError(
            f"{key}: an lm_eval task needs {key}.task: a harness task name (e.g. hellaswag), a task YAML file, "
            "or a shipped task (arith_choice, arith_exact)"
        )
    if t.task and t.task.endswith((".yaml", ".yml")) and not Path(t.task).is_file():
        raise ConfigError(f"{key}.task={t.task!r}: no such task YAML file; give the path of a harness task YAML")
    if t.task and t.kind != EvalTaskKind.lm_eval:
        raise ConfigError(f"{key}.task is read by kind lm_eval only (this task is {t.kind}); remove it")
    if t.num_fewshot is not None and t.num_fewshot < 0:
        raise ConfigError(f"{key}.num_fewshot={t.num_fewshot} must be >= 0")
    if t.kind == EvalTaskKind.preference and t.reward is None:
        raise ConfigError(
            f"{key}: a preference task needs a reward to compare completions with: set {key}.reward to a "
            "built-in or 'package.module:function' taking (prompt, completion) and returning a float"
        )
