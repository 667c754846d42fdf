"""The model card (`README.md`): what the model is, how it was trained, on which data, and,
once evaluated, what it was compared with, the scores with confidence intervals and the
gate's decision.

A training run writes it into each exported model directory (`write_export_cards`, from
the driver); `run.eval_after` rewrites it there with the eval's section; a standalone eval
writes the card with its section into its own run dir (never into the candidate's).

What the run recorded (its `config.yaml`: base model, method, stage and the
hyperparameters that shape the result, the training data) is read from there; a run that
started from another run's export (`run.init_from`, a chained recipe) lists that run
first, so the card shows the stage chain. The training data's rows are counted and hashed
when they are local (a file or a generator). Intended use and limitations come from
`eval.intended_use` / `eval.limitations`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from orchestrator.evals.contamination import markdown_lines as contamination_lines
from orchestrator.evals.report import gate_lines, metrics_table, tasks_lines

log = logging.getLogger("orchestrator")

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


def _stage_line(cfg: dict[str, Any]) -> str:
    train = cfg.get("train", {})
    hp = ", ".join(f"{k}={train[k]}" for k in HYPERPARAMETERS if k in train)
    method = cfg.get("method", {})
    extra = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name" and not isinstance(v, (dict, list)))
    data = cfg.get("data", {}).get("source")
    return (
        f"stage {cfg['stage']['name']}, method {method.get('name')}"
        + (f" ({extra})" if extra else "")
        + (f"; {hp}; data `{data}`")
    )


def stage_chain(cfg: dict[str, Any], limit: int = 8) -> list[tuple[Optional[Path], dict[str, Any]]]:
    """The runs before the one recorded in `cfg` whose exports it started from, first first:
    (run dir, recorded config)."""
    import yaml

    from orchestrator.evals.models import run_dir_of

    chain: list[tuple[Optional[Path], dict[str, Any]]] = []
    start = cfg["model"].get("pretrained")
    while start and Path(start).is_dir() and len(chain) < limit:
        run = run_dir_of(Path(start))
        if run is None:
            break
        prev = yaml.safe_load((run / "config.yaml").read_text())
        chain.insert(0, (run, prev))
        start = prev["model"].get("pretrained")
    return chain


def _recipe(model) -> list[str]:
    cfg = model.run_config
    if not cfg:
        return [f"- weights: `{model.weights}` (not a run of this project: recipe unknown)"]
    chain = stage_chain(cfg)
    first = chain[0][1] if chain else cfg
    start = first["model"].get("pretrained") or f"{first['model']['name']} built locally (random init)"
    train = cfg.get("train", {})
    hp = ", ".join(f"{k}={train[k]}" for k in HYPERPARAMETERS if k in train)
    method = cfg.get("method", {})
    extra = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name" and not isinstance(v, (dict, list)))
    lines = [
        f"- weights: `{model.weights}`",
        f"- produced by the run in `{model.run_dir}`",
        f"- base model: `{start}`",
        f"- stage: {cfg['stage']['name']}; method: {method.get('name')}" + (f" ({extra})" if extra else ""),
        f"- hyperparameters: {hp}",
        f"- backend: {cfg.get('backend', {}).get('name')}",
    ]
    if chain:
        lines.append("- stage chain (each run started from the previous one's export):")
        lines += [f"  {i}. {_stage_line(c)} (run `{r}`)" for i, (r, c) in enumerate(chain, 1)]
        lines.append(f"  {len(chain) + 1}. {_stage_line(cfg)} (this run)")
    return lines


def _data(summary: Optional[dict[str, Any]]) -> list[str]:
    if summary is None:
        return ["Unknown (the candidate is not a run of this project)."]
    rows = f"{summary['rows']} rows, sha256 `{summary['sha256']}`" if "rows" in summary else summary.get("note", "")
    return [f"- `{summary['source']}` (split {summary['split']}): {rows}"]


def _evaluation(report: dict[str, Any]) -> list[str]:
    return [
        "## Evaluation",
        "",
        f"Compared with the base `{report['base']['weights']}` ({report['base']['ref']}) on the same items "
        f"({report['date']}).",
        "",
        *metrics_table(report),
        "",
        *tasks_lines(report),
        "",
        *(
            ["### Contamination", "", *contamination_lines(report["contamination"]), ""]
            if report.get("contamination")
            else []
        ),
        "## Promotion gate",
        "",
        *gate_lines(report),
        "",
    ]


def model_card(report: Optional[dict[str, Any]], candidate, eval_cfg, date: Optional[str] = None) -> str:
    """The card's markdown; `report` None: a model not evaluated (yet)."""
    date = date or (report["date"] if report else _now())
    state = f"Promotion gate: **{report['decision']}**." if report else "Not evaluated yet (see run.eval_after)."
    lines = [
        f"# Model card: {candidate.spec.name}",
        "",
        f"Date: {date}. {state}",
        "",
        "## Model",
        "",
        *_recipe(candidate),
        "",
        "## Training data",
        "",
        *_data(training_data_summary(candidate)),
        "",
        *(_evaluation(report) if report else []),
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_export_cards(
    cfg, run_dir: Path, config_dict: dict[str, Any], exports: dict[str, str], report: Optional[dict[str, Any]] = None
) -> list[str]:
    """`README.md` into every exported model directory of the run in `run_dir` (recorded
    config `config_dict`); with `report`, the eval's section too. The paths written."""
    from dataclasses import replace

    from orchestrator.evals.models import EvalModel

    written = []
    for path in exports.values():
        out = Path(path)
        if not out.is_dir():
            continue
        model = EvalModel("candidate", str(run_dir), replace(cfg.model, pretrained=str(out)), run_dir, config_dict)
        try:
            (out / "README.md").write_text(model_card(report, model, cfg.eval))
        except OSError as exc:  # the export stays usable without its card
            log.warning("model card not written into %s: %s", out, exc)
            continue
        written.append(str(out / "README.md"))
    return written
