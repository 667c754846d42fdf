"""The model card (`README.md` in the eval run dir): what the candidate is, what it was
compared with, on which data, the scores with confidence intervals, and the gate's decision.

What the candidate's run recorded (its `config.yaml`: base model, method, stage and the
hyperparameters that shape the result, the training data) is read from there; the
training data's rows are counted and hashed when they are local (a file or a generator).
Intended use and limitations come from `eval.intended_use` / `eval.limitations`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from orchestrator.evals.report import gate_lines, metrics_table, tasks_lines

HYPERPARAMETERS = ("max_steps", "epochs", "global_batch_size", "lr", "scheduler", "warmup_steps", "seed")


def training_data_summary(model) -> Optional[dict[str, Any]]:
    """Source, rows and sha256 of the candidate's training data (from its run), when local."""
    d = model.training_data()
    if d is None:
        return None
    out: dict[str, Any] = {"source": d.source, "split": d.split, "num_samples": d.num_samples}
    if d.source.startswith("hf:"):
        out["note"] = "hub data set: not hashed here"
        return out
    from orchestrator.data.sources import load_rows

    try:
        rows = [r.value for r in load_rows(d)]
    except Exception as exc:  # noqa: BLE001  (the card says why it has no hash; the eval goes on)
        out["note"] = f"not readable from here ({type(exc).__name__})"
        return out
    out["rows"] = len(rows)
    out["sha256"] = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()
    return out


def _recipe(model) -> list[str]:
    cfg = model.run_config
    if not cfg:
        return [f"- weights: `{model.weights}` (not a run of this project: recipe unknown)"]
    start = cfg["model"].get("pretrained") or f"{cfg['model']['name']} built locally (random init)"
    train = cfg.get("train", {})
    hp = ", ".join(f"{k}={train[k]}" for k in HYPERPARAMETERS if k in train)
    method = cfg.get("method", {})
    extra = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name" and not isinstance(v, (dict, list)))
    return [
        f"- weights: `{model.weights}`",
        f"- produced by the run in `{model.run_dir}`",
        f"- started from: `{start}`",
        f"- stage: {cfg['stage']['name']}; method: {method.get('name')}" + (f" ({extra})" if extra else ""),
        f"- hyperparameters: {hp}",
        f"- backend: {cfg.get('backend', {}).get('name')}",
    ]


def _data(summary: Optional[dict[str, Any]]) -> list[str]:
    if summary is None:
        return ["Unknown (the candidate is not a run of this project)."]
    rows = f"{summary['rows']} rows, sha256 `{summary['sha256']}`" if "rows" in summary else summary.get("note", "")
    return [f"- `{summary['source']}` (split {summary['split']}): {rows}"]


def model_card(report: dict[str, Any], candidate, eval_cfg) -> str:
    """The card's markdown."""
    lines = [
        f"# Model card: {candidate.spec.name}",
        "",
        f"Date: {report['date']}. Promotion gate: **{report['decision']}**.",
        "",
        "## Model",
        "",
        *_recipe(candidate),
        "",
        "## Training data",
        "",
        *_data(training_data_summary(candidate)),
        "",
        "## Evaluation",
        "",
        f"Compared with the base `{report['base']['weights']}` ({report['base']['ref']}) on the same items.",
        "",
        *metrics_table(report),
        "",
        *tasks_lines(report),
        "",
        "## Promotion gate",
        "",
        *gate_lines(report),
        "",
        "## Intended use",
        "",
        eval_cfg.intended_use or "Not stated (set eval.intended_use).",
        "",
        "## Limitations",
        "",
        eval_cfg.limitations or "Not stated (set eval.limitations).",
        "",
    ]
    return "\n".join(lines)
