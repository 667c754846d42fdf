"""Evaluation task kinds: each scores one model on its items, per item, so that the
candidate and the base can be compared item by item. Registry: `TASKS` (a plain dict).

A task reports metrics as per-item `MetricScores` (the metric is sum(x) / sum(w); see
orchestrator/algos/eval_stats.py); its first metric is its primary one (the default gate's).

* `generation` (verifiable generation): one greedy completion per item scored by the
  reward (`accuracy`: the share of items whose reward is at least 1); with `samples` > 1,
  that many sampled completions per item at `temperature`, and `pass@k` for each k with
  the unbiased estimator.
* `nll`: per-token negative log-likelihood of each item's reference answer given its
  prompt, or of a whole document (`nll`, lower is better; the report adds the perplexity
  exp(nll)).
* `choice` (multiple choice by log-likelihood): the choice with the highest summed
  log-prob as the assistant's answer (`accuracy`), and with the highest mean log-prob
  per token (`accuracy_norm`, which does not favour short choices).
* `preference`: one greedy completion per item from each model, scored by the task's
  `reward` (`reward`: the mean score), and the candidate's `win_rate` over the base on the
  same items (a win 1, a tie 0.5, a loss 0), reported against 0.5 (no preference) with a
  bootstrap interval and the sign test on the untied items; per-item outcomes in the report.
* `lm_eval`: a task of lm-evaluation-harness (its registry, a task YAML, or one shipped in
  `lm_eval_tasks/`), answered by the same models (orchestrator/evals/harness.py); every
  metric it scores per item.

A task compares the two models' scores in `compare` (by default every metric with
orchestrator/evals/gate.py's `compare`); a task whose metric is itself paired (the
preference task's win rate) adds its comparison there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from orchestrator.algos import eval_stats as st
from orchestrator.algos.eval_stats import pass_at_k
from orchestrator.errors import ConfigError
from orchestrator.evals.items import items_hash
from orchestrator.evaluation import ModelScorer, rewards_of
from orchestrator.rollout.base import SamplingParams


@dataclass
class MetricScores:
    """One model's per-item values of one metric: the metric is sum(x) / sum(w)."""

    x: list[float]
    w: Optional[list[float]] = None


@dataclass
class GenerationSettings:
    """What every generation task shares unless the task sets its own."""

    reward: str
    max_new_tokens: int
    stop: list[str]
    seed: int


class EvalTask:
    """A task: a name, its items, and how to score one model on them."""

    kind: ClassVar[str] = ""
    needs_logprobs: ClassVar[bool] = False
    needs_generation: ClassVar[bool] = False

    def __init__(self, name: str, spec, items: list[Any], source: str, gen: GenerationSettings):
        self.name, self.spec, self.items, self.source, self.gen = name, spec, items, source, gen

    def metrics(self) -> dict[str, bool]:
        """Metric name -> whether higher is better; the first is the task's primary metric."""
        raise NotImplementedError

    def score(self, model: ModelScorer) -> dict[str, MetricScores]:
        raise NotImplementedError

    def compare(self, cand: dict[str, MetricScores], base: dict[str, MetricScores], settings) -> list:
        """The `Comparison` of every metric (orchestrator/evals/gate.py) from both models' scores."""
        from orchestrator.evals.gate import compare

        return [compare(self.name, m, hib, cand[m], base[m], settings) for m, hib in self.metrics().items()]

    def describe(self) -> dict[str, Any]:
        """What the report says about the task (and what makes its results reusable on resume)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "items": len(self.items),
            "items_sha256": items_hash(self.items),
        }


class GenerationTask(EvalTask):
    kind = "generation"
    needs_generation = True

    def metrics(self) -> dict[str, bool]:
        out = {"accuracy": True}
        if self.spec.samples > 1:
            out.update({f"pass@{k}": True for k in self.spec.k})
        return out

    def settings(self) -> dict[str, Any]:
        s = self.spec
        return {
            "reward": s.reward or self.gen.reward,
            "max_new_tokens": s.max_new_tokens or self.gen.max_new_tokens,
            "stop": list(self.gen.stop),
            "greedy": True,
            "samples": s.samples,
            "temperature": s.temperature if s.samples > 1 else None,
            "top_p": 1.0,
            "seed": self.gen.seed,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "generation": self.settings()}

    def score(self, model: ModelScorer) -> dict[str, MetricScores]:
        cfg = self.settings()
        prompts = [it["messages"] for it in self.items]
        answers = [it["answer"] for it in self.items]
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg["max_new_tokens"], stop=cfg["stop"])
        rewards = rewards_of(model.generate(prompts, greedy, cfg["seed"]), answers, cfg["reward"])
        out = {"accuracy": MetricScores([float(r >= 1.0) for r in rewards])}
        n = self.spec.samples
        if n > 1:
            sampling = SamplingParams(
                n=n, temperature=cfg["temperature"], max_new_tokens=cfg["max_new_tokens"], stop=cfg["stop"]
            )
            comps = model.generate(prompts, sampling, cfg["seed"] + 1)
            rewards = rewards_of(comps, [a for a in answers for _ in range(n)], cfg["reward"])
            correct = [sum(r >= 1.0 for r in rewards[i * n : (i + 1) * n]) for i in range(len(self.items))]
            for k in self.spec.k:
                out[f"pass@{k}"] = MetricScores([pass_at_k(n, c, k) for c in correct])
        return out


class NllTask(EvalTask):
    kind = "nll"
    needs_logprobs = True

    def metrics(self) -> dict[str, bool]:
        return {"nll": False}

    def score(self, model: ModelScorer) -> dict[str, MetricScores]:
        docs = [i for i, it in enumerate(self.items) if isinstance(it, dict)]
        convs = [i for i, it in enumerate(self.items) if not isinstance(it, dict)]
        scored: dict[int, tuple[float, int]] = {}
        if docs:
            scored.update(zip(docs, model.text_logprobs([self.items[i]["text"] for i in docs])))
        if convs:
            pairs = [(self.items[i][:-1], self.items[i][-1:]) for i in convs]
            scored.update(zip(convs, model.completion_logprobs(pairs)))
        ordered = [scored[i] for i in range(len(self.items))]
        return {"nll": MetricScores([-lp for lp, _ in ordered], [float(n) for _, n in ordered])}


class ChoiceTask(EvalTask):
    kind = "choice"
    needs_logprobs = True

    def metrics(self) -> dict[str, bool]:
        return {"accuracy": True, "accuracy_norm": True}

    def score(self, model: ModelScorer) -> dict[str, MetricScores]:
        pairs = [
            (it["messages"], [{"role": "assistant", "content": choice}])
            for it in self.items
            for choice in it["choices"]
        ]
        scored = iter(model.completion_logprobs(pairs))
        acc, acc_norm = [], []
        for it in self.items:
            lps = [next(scored) for _ in it["choices"]]
            total = [lp for lp, _ in lps]
            mean = [lp / max(n, 1) for lp, n in lps]
            acc.append(float(max(range(len(total)), key=total.__getitem__) == it["answer"]))
            acc_norm.append(float(max(range(len(mean)), key=mean.__getitem__) == it["answer"]))
        return {"accuracy": MetricScores(acc), "accuracy_norm": MetricScores(acc_norm)}


def prompt_text(messages: list[dict[str, str]]) -> str:
    """The prompt a preference reward sees: the conversation's last user message."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def preference_scores(reward: str, items: list[Any], completions: list[str]) -> list[float]:
    """`reward` of each item's completion: a built-in is called with (completion, answer), an
    import path `module:function` with (prompt, completion)."""
    from orchestrator.rewards import REWARDS, resolve

    fn = resolve(reward)
    if reward in REWARDS:
        return [float(fn(c, it.get("answer"))) for it, c in zip(items, completions)]
    return [float(fn(prompt_text(it["messages"]), c)) for it, c in zip(items, completions)]


class PreferenceTask(EvalTask):
    kind = "preference"
    needs_generation = True

    def metrics(self) -> dict[str, bool]:
        return {"win_rate": True, "reward": True}

    def settings(self) -> dict[str, Any]:
        s = self.spec
        return {
            "reward": s.reward,
            "max_new_tokens": s.max_new_tokens or self.gen.max_new_tokens,
            "stop": list(self.gen.stop),
            "greedy": True,
            "samples": 1,
            "temperature": None,
            "top_p": 1.0,
            "seed": self.gen.seed,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "generation": self.settings()}

    def score(self, model: ModelScorer) -> dict[str, MetricScores]:
        cfg = self.settings()
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg["max_new_tokens"], stop=cfg["stop"])
        comps = model.generate([it["messages"] for it in self.items], greedy, cfg["seed"])
        return {"reward": MetricScores(preference_scores(cfg["reward"], self.items, [c.text for c in comps]))}

    def compare(self, cand: dict[str, MetricScores], base: dict[str, MetricScores], settings) -> list:
        from orchestrator.evals.gate import Comparison, compare

        outcome = [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(cand["reward"].x, base["reward"].x)]
        wins, losses = outcome.count(1.0), outcome.count(0.0)
        kw = dict(level=settings.confidence, resamples=settings.bootstrap_resamples, seed=settings.seed)
        lo, hi = st.bootstrap_ci(outcome, None, **kw)
        rate = st.ratio(outcome)
        win = Comparison(
            task=self.name,
            metric="win_rate",
            higher_is_better=True,
            items=len(outcome),
            candidate=rate,
            candidate_ci=(lo, hi),
            base=0.5,
            base_ci=(0.5, 0.5),
            delta=rate - 0.5,
            delta_ci=(lo - 0.5, hi - 0.5),
            p_value=st.sign_test(wins, losses),
            test="sign_test",
            outcomes={
                "wins": wins,
                "ties": len(outcome) - wins - losses,
                "losses": losses,
                "per_item": "".join("W" if o == 1.0 else "T" if o == 0.5 else "L" for o in outcome),
            },
        )
        return [win, compare(self.name, "reward", True, cand["reward"], base["reward"], settings)]


class LmEvalTask(EvalTask):
    kind = "lm_eval"

    def __init__(self, name: str, spec, items: list[Any], source: str, gen: GenerationSettings, limit, harness):
        """`harness`: the loaded harness task (its items came from it); `limit`: items scored."""
        from orchestrator.evals.harness import task_metrics

        super().__init__(name, spec, items, source, gen)
        self.limit, self.harness = limit, harness
        self.table = task_metrics(self.harness)
        if not self.table:
            raise ConfigError(
                f"eval task {name} ({spec.task}): none of its metrics has a per-item value to compare "
                "with the base; choose a task scored per item (accuracy, exact match, perplexity)"
            )
        kind = self.harness.OUTPUT_TYPE
        self.needs_logprobs = kind != "generate_until"
        self.needs_generation = kind in ("generate_until", "loglikelihood")

    def metrics(self) -> dict[str, bool]:
        return {name: hib for name, (_, _, _, hib) in self.table.items()}

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        h = self.harness
        return {
            **super().describe(),
            "lm_eval": {
                "task": h.config.task,
                "output_type": h.OUTPUT_TYPE,
                "num_fewshot": h.config.num_fewshot or 0,
                "version": version("lm_eval"),
            },
        }

    def score(self, model: ModelScorer) -> dict[str, MetricScores]:
        from orchestrator.evals.harness import load_task, run_task

        s = self.spec
        task = load_task(s.task, f"eval.tasks[{self.name}]", s.num_fewshot, self.gen.seed)  # fresh per model
        values = run_task(task, model, self.limit, self.gen.seed)
        out = {}
        for name, (metric, flt, value, _) in self.table.items():
            xw = [value(v) for v in values[f"{metric}|{flt}"]]
            out[name] = MetricScores([x for x, _ in xw], [w for _, w in xw])
        return out


TASKS: dict[str, type[EvalTask]] = {
    "generation": GenerationTask,
    "nll": NllTask,
    "choice": ChoiceTask,
    "preference": PreferenceTask,
    "lm_eval": LmEvalTask,
}


def default_specs(train) -> list:
    """The tasks of an eval that names none: the candidate's held-out training data as nll, and
    as generation when its rows carry answers."""
    from orchestrator.config.evaluation import EvalTaskKind, EvalTaskSpec
    from orchestrator.evals.items import is_verifiable

    specs = [EvalTaskSpec(kind=EvalTaskKind.nll)]
    if train is not None and train.source.startswith("synthetic:") and is_verifiable(train):
        specs.append(EvalTaskSpec(kind=EvalTaskKind.generation))
    return specs


def build_tasks(cfg, train) -> list[EvalTask]:
    """The eval run's tasks with their items (`train`: the candidate's training data, if known)."""
    from orchestrator.evals.items import load_items, source_label

    e, r = cfg.eval, cfg.rollout
    gen = GenerationSettings(e.reward, e.max_new_tokens or r.max_new_tokens, list(r.stop), e.seed)
    specs = list(e.tasks) or default_specs(train)
    tasks = []
    for i, spec in enumerate(specs):
        key = f"eval.tasks[{i}]" if e.tasks else "eval.tasks (default)"
        n = spec.items or e.items or e.samples
        if str(spec.kind) == "lm_eval":
            from orchestrator.evals.harness import load_task, task_items

            name = spec.name or re.sub(r"[^\w]+", "_", Path(spec.task).stem).strip("_").lower()
            harness = load_task(spec.task, key, spec.num_fewshot, e.seed)
            tasks.append(LmEvalTask(name, spec, task_items(harness, n), f"lm-eval task {spec.task}", gen, n, harness))
            continue
        items = load_items(str(spec.kind), spec.source, spec.split, n, train, key)
        name = spec.name or f"{spec.kind}_{source_label(spec.source)}"
        source = spec.source or f"held-out split of {train.source}"
        tasks.append(TASKS[str(spec.kind)](name, spec, items, source, gen))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.tasks: two tasks are named alike ({names}); give them distinct `name`s")
    return tasks
