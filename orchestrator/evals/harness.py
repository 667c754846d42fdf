"""lm-evaluation-harness tasks as an evaluation task kind (`{kind: lm_eval, task: ...}`).

The harness defines the task (prompts, few-shot examples, filters, metrics) and scores the
responses; this module answers its requests with the eval's own models: `ScorerLM` is the
harness's `LM` interface over a `ModelScorer` (orchestrator/evaluation.py), so a task runs on
the candidate and on the base through the same frozen worker groups and rollout engines as
every other task, sharded over the workers, with no second copy of a model loaded.

A task is named as the harness names it (`hellaswag`, `gsm8k`: its registry; the datasets
come from the hub or its cache), as a task YAML file (loaded by the harness from that
file's folder), or as one of the tasks shipped in `lm_eval_tasks/` next to this module
(offline: their data files sit beside them). Per-item results (`log_samples`) give the
paired comparison with the base; metrics the harness aggregates per item (`mean`, and the
perplexities as their logarithm: a mean NLL) are compared; corpus-level ones (BLEU, F1)
have no per-item value and are left out with a log line.

Request handling follows the harness's own `HFLM`: a context's trailing spaces move to the
continuation, an empty context is the BOS token (end-of-text without one), long documents are scored in
rolling windows (the harness's `get_rolling_token_windows`), and `is_greedy` (used by
`loglikelihood` tasks such as LAMBADA) is whether greedy decoding reproduces the
continuation; it costs a short generation per request, so only those tasks ask for it.
"""

from __future__ import annotations

import logging
import math
from functools import cache
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator.errors import ConfigError
from orchestrator.rollout.base import SamplingParams

log = logging.getLogger("orchestrator")

SHIPPED = Path(__file__).parent / "lm_eval_tasks"
"""Tasks that ship with the project, each a YAML with its data file beside it."""

INSTALL = "pip install 'orchestrator[eval]' (lm-eval)"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise ConfigError(f"eval task kind lm_eval needs lm-evaluation-harness: {INSTALL}") from exc
    return LM


def shipped_tasks() -> list[str]:
    """Names of the tasks in `lm_eval_tasks/`."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads a harness YAML for its plain keys, leaving its `!function` tags unresolved."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _shipped_config(name: str) -> dict[str, Any]:
    """A shipped task's config, its data files made absolute (they sit beside the YAML)."""
    path = SHIPPED / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: str(SHIPPED / v) for k, v in files.items()}
    return cfg


@cache
def _registry():
    """The harness's full task index (it reads every task YAML it ships: seconds to minutes)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_task(task: str, key: str, num_fewshot: Optional[int], seed: int) -> Any:
    """The harness `Task` named by `task` (a shipped name, a YAML path, or a registry name)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    path = Path(task)
    if task in shipped_tasks():
        spec: Any = _shipped_config(task)
        manager = TaskManager(include_defaults=False)
    elif path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{key}.task={task!r}: no such task YAML file; give the path of a harness task YAML")
        spec = (yaml.load(path.read_text(), Loader=_TagTolerantLoader) or {}).get("task")
        if not isinstance(spec, str):
            raise ConfigError(f"{key}.task={task!r}: the YAML names no `task:`; a harness task YAML names its task")
        manager = TaskManager(include_defaults=False, include_path=str(path.resolve().parent))
    else:
        spec, manager = task, _registry()
    try:
        tasks = get_task_dict([spec], manager)
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"{key}.task={task!r}: lm-evaluation-harness has no such task ({str(exc).splitlines()[0]}); name a "
            f"task of its registry (`lm-eval ls tasks`), a task YAML file, or a shipped task ({shipped_tasks()})"
        ) from exc
    leaves = [t for t in tasks.values() if hasattr(t, "eval_docs")]
    if len(tasks) != 1 or len(leaves) != 1:
        raise ConfigError(f"{key}.task={task!r} is a group of tasks; name one task per eval task entry")
    out = leaves[0]
    if num_fewshot is not None:
        out.set_config(key="num_fewshot", value=num_fewshot)
    out.set_fewshot_seed(seed=seed)
    return out


def task_items(task: Any, limit: Optional[int]) -> list[dict[str, Any]]:
    """The first `limit` documents as items (what the report hashes and the decontamination
    check reads): the prompt text and the reference answer."""
    docs = task.eval_docs
    n = len(docs) if limit is None else min(limit, len(docs))
    items = []
    for i in range(n):
        doc = docs[i]
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
            target = task.doc_to_choice(doc)[target]
        items.append({"text": str(task.doc_to_text(doc)), "target": str(target)})
    return items


# The harness's per-item aggregations this module compares, and how: metric name, the
# per-item value as (x, weight), and whether higher is better (None: the task says).
def _per_item(metric: str, aggregation: str) -> Optional[tuple[str, Any, Optional[bool]]]:
    if aggregation == "mean":
        return metric, lambda v: (float(v), 1.0), None
    if aggregation == "perplexity":  # exp(-mean ll): compared as its log, the mean NLL
        return f"log_{metric}", lambda v: (-float(v), 1.0), False
    if aggregation == "weighted_perplexity":  # exp(-sum ll / sum units)
        return f"log_{metric}", lambda v: (-float(v[0]), float(v[1])), False
    if aggregation == "bits_per_byte":  # -sum ll / sum bytes / ln 2
        return metric, lambda v: (-float(v[0]) / math.log(2), float(v[1])), False
    return None


def task_metrics(task: Any) -> dict[str, tuple[str, str, Any, bool]]:
    """Report name -> (harness metric, filter, per-item value function, higher is better)."""
    filters = [f.name for f in task._filters]
    hib, agg = task.higher_is_better(), task.aggregation()
    out: dict[str, tuple[str, str, Any, bool]] = {}
    for f in filters:
        for metric, fn in agg.items():
            how = _per_item(metric, getattr(fn, "__name__", ""))
            if how is None:
                log.info("eval: %s/%s is a corpus-level metric with no per-item value; not compared", task, metric)
                continue
            name, value, better = how
            name = name if len(filters) == 1 else f"{name},{f}"
            out[name] = (metric, f, value, bool(hib.get(metric, True)) if better is None else better)
    return out


def make_scorer_lm(scorer, greedy_check: bool, seed: int) -> Any:
    """The harness `LM` answering requests with `scorer`'s model (see the module docstring)."""
    LM = _lm_eval()

    class ScorerLM(LM):
        def __init__(self):
            super().__init__()
            self.tok = scorer.tokenizer
            # the token a document or an empty context starts from: BOS, else end-of-text (as HFLM)
            self.prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            self.max_length = scorer.max_length or 2048

        def _encode(self, text: str) -> list[int]:
            return list(self.tok(text, add_special_tokens=False)["input_ids"])

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if not context:
                return [self.prefix], self._encode(continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            return ctx, whole[len(ctx) :]

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [self._pair(*r.args) for r in requests]
            rows = []
            for ctx, cont in pairs:
                ids = (ctx + cont)[-(self.max_length + 1) :]
                rows.append({"input_ids": ids, "prompt_len": len(ids) - len(cont), "weight": 1.0, "adv": 0.0})
            scores = [lp for lp, _ in scorer.row_logprobs(rows)]
            greedy = self._greedy(pairs) if greedy_check else [False] * len(pairs)
            return list(zip(scores, greedy))

        def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
            longest = max((len(c) for _, c in pairs), default=0)
            sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=max(longest, 1))
            outs = scorer.rollout.generate([ctx for ctx, _ in pairs], sampling, seed)
            return [list(o.token_ids[: len(c)]) == c for o, (_, c) in zip(outs, pairs)]

        def loglikelihood_rolling(self, requests) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            rows, owner = [], []
            for k, r in enumerate(requests):
                ids = self._encode(r.args[0])
                windows = get_rolling_token_windows(ids, self.prefix, self.max_length, context_len=1)
                for ctx, pred in map(make_disjoint_window, windows):
                    rows.append({"input_ids": ctx + pred, "prompt_len": len(ctx), "weight": 1.0, "adv": 0.0})
                    owner.append(k)
            totals = [0.0] * len(requests)
            for k, (lp, _) in zip(owner, scorer.row_logprobs(rows)):
                totals[k] += lp
            return totals

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, kw = r.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kw.get("max_gen_toks", 256))
                sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
                sampling = SamplingParams(
                    n=1,
                    temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                    top_p=float(kw.get("top_p", 1.0)) if sample else 1.0,
                    max_new_tokens=new,
                    stop=until,
                )
                ids = self._encode(context)[-max(self.max_length - new, 1) :]
                text = scorer.rollout.generate([ids], sampling, seed)[0].text
                for stop in until:  # the harness expects the text before the stop sequence
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return ScorerLM()


def run_task(task: Any, scorer, limit: Optional[int], seed: int) -> dict[str, list[Any]]:
    """Per-item values of every harness metric of `task` on `scorer`'s model, in document
    order: {(metric, filter) as "metric|filter": [value per item]}."""
    from lm_eval.evaluator import evaluate

    lm = make_scorer_lm(scorer, greedy_check=task.OUTPUT_TYPE == "loglikelihood", seed=seed)
    res = evaluate(lm=lm, task_dict={task.config.task: task}, limit=limit, log_samples=True, bootstrap_iters=0)
    samples = sorted(res["samples"][task.config.task], key=lambda s: (s["filter"], s["doc_id"]))
    out: dict[str, list[Any]] = {}
    for s in samples:
        for metric in s["metrics"]:
            out.setdefault(f"{metric}|{s['filter']}", []).append(s[metric])
    return out
