"""Charts of runs from their run directories: PNGs and a Markdown page that links them.
This module draws every chart the project writes: the run charts here, the evaluation
report's (`eval_report_chart`) and the benchmark suite's (`benchmark_chart`).

Each chart plots one metric of `metrics.jsonl` against the step, one line per run (run i
in matplotlib's color `C<i>` on every chart, so a run keeps its color across charts):
loss, learning rate, gradient norm, tokens/s, and for RL the reward mean (with a band of
one standard deviation), KL, completion length and held-out accuracy during training. The
`eval` chart shows each run's held-out accuracy before and after training (`summary.json`:
`eval_before` / `eval_resumed` and `eval_after`). A chart is drawn when at least one run
has its metric. The end of every run writes its own charts to `<run dir>/plots`;
`python -m orchestrator.report` overlays several runs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("orchestrator")


@dataclass(frozen=True)
class Chart:
    name: str
    """File stem and Markdown heading."""
    title: str
    key: str
    """The metric plotted against the step."""
    band: Optional[str] = None
    """A metric drawn as +- band around `key` (the reward's standard deviation)."""


CHARTS = (
    Chart("loss", "loss", "loss"),
    Chart("lr", "learning rate", "lr"),
    Chart("grad_norm", "gradient norm (before clipping)", "grad_norm"),
    Chart("tokens_per_s", "throughput (tokens/s)", "tokens_per_s"),
    Chart("reward", "reward (mean +- std over the step's samples)", "reward_mean", band="reward_std"),
    Chart("kl", "KL to the reference policy", "kl"),
    Chart("completion_len", "completion length (tokens)", "completion_len"),
    Chart("eval_accuracy", "held-out accuracy during training", "eval_accuracy"),
)
EVAL_CHART = "eval"


@dataclass
class RunData:
    """One run's metrics and summary, as its run directory holds them."""

    label: str
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records holding a finite number for `key`."""
        pts = [(r["step"], float(r[key])) for r in self.records if _finite(r.get(key))]
        return [s for s, _ in pts], [v for _, v in pts]

    def eval_before_after(self) -> Optional[tuple[float, float]]:
        s = self.summary
        before = s.get("eval_before", s.get("eval_resumed"))
        after = s.get("eval_after")
        return (float(before), float(after)) if _finite(before) and _finite(after) else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a line cut by a crash is skipped)."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def load_run(run_dir: Path, label: Optional[str] = None) -> RunData:
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return RunData(label or run_dir.name, read_records(run_dir / "metrics.jsonl"), summary)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _line_chart(plt, chart: Chart, runs: list[RunData], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = 0
    for i, run in enumerate(runs):
        steps, values = run.series(chart.key)
        if not steps:
            continue
        ax.plot(steps, values, color=f"C{i % 10}", linewidth=2, label=run.label, marker="o" if len(steps) < 3 else None)
        if chart.band:
            std = _aligned(run, chart.band, steps)
            lo, hi = [v - d for v, d in zip(values, std)], [v + d for v, d in zip(values, std)]
            ax.fill_between(steps, lo, hi, color=f"C{i % 10}", alpha=0.2)
        drawn += 1
    if drawn:
        ax.set(title=chart.title if len(runs) > 1 else f"{chart.title}: {runs[0].label}", xlabel="step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return bool(drawn)


def _aligned(run: RunData, key: str, steps: list[int]) -> list[float]:
    """`key` at `steps` (0 where a record lacks it)."""
    by_step = {r["step"]: float(r[key]) for r in run.records if _finite(r.get(key))}
    return [by_step.get(s, 0.0) for s in steps]


def _eval_chart(plt, runs: list[RunData], path: Path) -> bool:
    """Held-out accuracy before and after training, two bars per run that has both."""
    pairs = [(i, run, run.eval_before_after()) for i, run in enumerate(runs)]
    pairs = [(i, run, ba) for i, run, ba in pairs if ba is not None]
    if not pairs:
        return False
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(pairs) + 2), 3.6))
    for x, (i, _run, (before, after)) in enumerate(pairs):
        color = f"C{i % 10}"
        ax.bar(x - 0.2, before, width=0.4, color=color, alpha=0.35, hatch="//", edgecolor=color)
        ax.bar(x + 0.2, after, width=0.4, color=color)
        for dx, v in ((-0.2, before), (0.2, after)):
            # the bar's top in the run's color, over the axis: a 0% bar still shows
            ax.plot([x + dx - 0.2, x + dx + 0.2], [v, v], color=color, linewidth=3, zorder=3, clip_on=False)
            ax.annotate(f"{v:.1%}", (x + dx, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(pairs)), [run.label for _, run, _ in pairs], fontsize=8)
    ax.set(title="held-out accuracy: before (hatched) and after training", ylim=(0, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_runs(runs: list[RunData], out_dir: Path) -> list[Path]:
    """Every chart some run has data for, as `<out_dir>/<chart>.png`; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        log.info("plots: matplotlib is not installed (pip install matplotlib); no charts")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in CHARTS:
        path = out_dir / f"{chart.name}.png"
        if _line_chart(plt, chart, runs, path):
            written.append(path)
    path = out_dir / f"{EVAL_CHART}.png"
    if _eval_chart(plt, runs, path):
        written.append(path)
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown(runs: list[RunData], charts: list[Path], title: str) -> str:
    """A page with the runs' key numbers and the charts (linked relative to the page)."""
    lines = [
        f"# {title}",
        "",
        "| run | steps | final loss | eval before | eval after | run dir |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.summary
        last = run.records[-1] if run.records else {}
        ba = run.eval_before_after() or (None, None)
        steps = s.get("steps", last.get("step"))
        loss = s.get("final_loss", last.get("loss"))
        lines.append(
            f"| {run.label} | {_fmt(steps)} | {_fmt(loss)} | {_fmt(ba[0])} | {_fmt(ba[1])} | {s.get('run_dir', '')} |"
        )
    titles = {c.name: c.title for c in CHARTS} | {EVAL_CHART: "held-out accuracy before and after training"}
    for path in charts:
        lines += ["", f"## {titles.get(path.stem, path.stem)}", "", f"![{path.stem}]({path.name})"]
    return "\n".join(lines) + "\n"


def write_report(runs: list[RunData], out_dir: Path, title: str) -> tuple[list[Path], Path]:
    """The charts and `<out_dir>/index.md`."""
    charts = plot_runs(runs, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.md"
    page.write_text(markdown(runs, charts, title))
    return charts, page


# ------------------------------------------------------------ other reports' charts
def eval_report_chart(report: dict[str, Any], path: Path) -> bool:
    """Candidate vs base per metric with interval bars; False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        log.info("no report chart: matplotlib is not installed (pip install matplotlib)")
        return False
    ms = report["metrics"]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.2 * len(ms), 3.2), squeeze=False)
    for ax, m in zip(axes[0], ms):
        vals = [m["candidate"], m["base"]]
        cis = [m["candidate_ci"], m["base_ci"]]
        err = [[v - ci[0] for v, ci in zip(vals, cis)], [ci[1] - v for v, ci in zip(vals, cis)]]
        ax.bar(["candidate", "base"], vals, yerr=err, capsize=6, color=["tab:blue", "tab:gray"])
        ax.set_title(f"{m['key']}\np={m['p_value']:.3g}", fontsize=9)
    fig.suptitle(f"{report['decision']} ({report['statistics']['confidence']:.0%} CIs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def benchmark_chart(doc: dict[str, Any], path: Path, machine: str) -> None:
    """Ratios of the benchmark suite (ours / peer) against their goals (benchmarks/report.py)."""
    plt = _pyplot()
    if plt is None:
        raise RuntimeError("the benchmark chart needs matplotlib: pip install -e '.[bench]'")

    rows = [
        (f"{name}: {r['name']}", r["value"], r["goal"])
        for name, e in doc["benchmarks"].items()
        for r in e.get("ratios", [])
        if not r.get("absolute") and isinstance(r.get("value"), (int, float)) and math.isfinite(r["value"])
    ]
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(rows), 1) + 1.6))
    if rows:
        labels, values, goals = zip(*rows)
        y = list(range(len(rows)))[::-1]
        colors = ["tab:grey" if g is None else "tab:green" if v <= g else "tab:red" for _, v, g in rows]
        ax.barh(y, values, color=colors, alpha=0.8)
        for yi, g in zip(y, goals):
            if g is not None:
                ax.plot([g, g], [yi - 0.4, yi + 0.4], color="black", lw=2)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(
        "ratio, lower is better for ours (black tick: goal, met in green, missed in red; "
        "grey: no goal; dotted: parity)",
        fontsize=8,
    )
    title = machine
    cut = title.find(", torch")
    ax.set_title(f"{doc['kind'].upper()}: {title[:cut]}\n{title[cut + 2 :]}" if cut > 0 else title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
