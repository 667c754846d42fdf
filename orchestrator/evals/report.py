"""The evaluation report: `report.json` (everything, machine-readable), `report.md` (the same
for people), `report.png` (candidate vs base per metric with confidence intervals; needs
matplotlib, skipped with a line without it), and a table in the trackers (`Tracker.log_table`).

All of it is written into the eval run's own directory; nothing is written where the
candidate's weights are.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator.evals.contamination import markdown_lines as contamination_lines
from orchestrator.evals.gate import Comparison, Decision
from orchestrator.tracking.plots import eval_report_chart

log = logging.getLogger("orchestrator")

TESTS = {
    "mcnemar_midp": "McNemar test, mid-p (two-sided binomial test on the items where exactly one model is right)",
    "paired_permutation": "paired permutation test (candidate and base labels swapped per item)",
    "sign_test": "exact two-sided sign test on the items one model's completion scored higher (ties left out)",
}


def build_report(stage, comparisons: list[Comparison], decision: Decision, date: str) -> dict[str, Any]:
    """The report's content; `stage` is the EvalStage (models, tasks, settings)."""
    e = stage.cfg.eval
    return {
        "decision": decision.verdict,
        "date": date,
        "candidate": _model(stage.candidate),
        "base": _model(stage.base),
        "tasks": [t.describe() for t in stage.tasks],
        "metrics": [_metric(c) for c in comparisons],
        "gate": {"alpha": e.alpha, "rules": [asdict(r) for r in decision.rules]},
        "contamination": getattr(stage, "contamination", None),
        "statistics": {
            "confidence": e.confidence,
            "intervals": "percentile bootstrap over items",
            "bootstrap_resamples": e.bootstrap_resamples,
            "permutation_resamples": e.permutation_resamples,
            "multiple_comparisons": "Holm over the gate's significant rules",
            "seed": e.seed,
            "tests": TESTS,
        },
    }


def _model(m) -> dict[str, Any]:
    return {"ref": m.ref, "weights": m.weights, "run_dir": str(m.run_dir) if m.run_dir else None}


def _metric(c: Comparison) -> dict[str, Any]:
    out = asdict(c)
    out["key"] = c.key
    if c.metric == "nll":  # perplexity: exp of the per-token NLL (and of its interval ends)
        out["perplexity"] = {
            "candidate": math.exp(c.candidate),
            "candidate_ci": [math.exp(v) for v in c.candidate_ci],
            "base": math.exp(c.base),
            "base_ci": [math.exp(v) for v in c.base_ci],
        }
    return out


def _ci(v: float, ci) -> str:
    return f"{v:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"


def metrics_table(report: dict[str, Any]) -> list[str]:
    level = f"{report['statistics']['confidence']:.0%}"
    lines = [
        f"| metric | candidate ({level} CI) | base ({level} CI) | delta ({level} CI) | p | test |",
        "|---|---|---|---|---|---|",
    ]
    for m in report["metrics"]:
        arrow = "higher is better" if m["higher_is_better"] else "lower is better"
        lines.append(
            f"| {m['key']} ({arrow}) | {_ci(m['candidate'], m['candidate_ci'])} | {_ci(m['base'], m['base_ci'])} "
            f"| {m['delta']:+.4g} [{m['delta_ci'][0]:+.4g}, {m['delta_ci'][1]:+.4g}] | {m['p_value']:.3g} "
            f"| {m['test']} |"
        )
        if m.get("outcomes"):
            o = m["outcomes"]
            lines.append(f"| {m['key']}: {o['wins']} wins, {o['ties']} ties, {o['losses']} losses | | | | | |")
        if "perplexity" in m:
            p = m["perplexity"]
            lines.append(
                f"| {m['task']}/perplexity | {_ci(p['candidate'], p['candidate_ci'])} | "
                f"{_ci(p['base'], p['base_ci'])} | | | |"
            )
    return lines


def gate_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"**{report['decision']}** (alpha {report['gate']['alpha']:g}; every rule must hold)", ""]
    for r in report["gate"]["rules"]:
        lines.append(f"- {'PASS' if r['passed'] else 'FAIL'} `{r['metric']}`: {'; '.join(r['reasons'])}")
    return lines


def tasks_lines(report: dict[str, Any]) -> list[str]:
    lines = ["| task | kind | source | items | sha256 of the items | generation |", "|---|---|---|---|---|---|"]
    for t in report["tasks"]:
        gen = t.get("generation")
        settings = (
            f"greedy + {gen['samples']} samples at T={gen['temperature']}" if gen and gen["samples"] > 1 else "greedy"
        )
        if gen:
            settings += f", max {gen['max_new_tokens']} new tokens, reward {gen['reward']}, seed {gen['seed']}"
        lines.append(
            f"| {t['name']} | {t['kind']} | {t['source']} | {t['items']} | `{t['items_sha256'][:16]}` "
            f"| {settings if gen else ''} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    c, b = report["candidate"], report["base"]
    lines = [
        f"# Evaluation: {report['decision']}",
        "",
        f"- candidate: {c['ref']} (`{c['weights']}`)",
        f"- base: {b['ref']} (`{b['weights']}`)",
        f"- date: {report['date']}",
        "",
        "## Gate",
        "",
        *gate_lines(report),
        "",
        "## Metrics",
        "",
        *metrics_table(report),
        "",
        "## Tasks",
        "",
        *tasks_lines(report),
        "",
        *(
            ["## Contamination", "", *contamination_lines(report.get("contamination")), ""]
            if report.get("contamination")
            else []
        ),
        "## Statistics",
        "",
        f"Intervals: {report['statistics']['intervals']} ({report['statistics']['bootstrap_resamples']} resamples). "
        "Paired tests on the same items: " + "; ".join(f"{k}: {v}" for k, v in TESTS.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def write(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """report.json, report.md and report.png in `out_dir`; {kind: path} of what was written."""
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "chart": out_dir / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["markdown"].write_text(markdown(report))
    if not eval_report_chart(report, paths["chart"]):
        del paths["chart"]
    return {k: str(v) for k, v in paths.items()}


def log_to_tracker(tracker, report: dict[str, Any]) -> None:
    """The metrics as a table and summary values in every tracker (orchestrator/tracking)."""
    if tracker is None:
        return
    tracker.log_summary(
        {f"eval/{m['key']}/{who}": m[who] for m in report["metrics"] for who in ("candidate", "base", "delta")}
    )
    cols = ["metric", "candidate", "base", "delta", "p_value", "test"]
    rows = [[m["key"], m["candidate"], m["base"], m["delta"], m["p_value"], m["test"]] for m in report["metrics"]]
    tracker.log_table("eval/report", cols, rows)
