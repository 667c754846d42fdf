"""Result files: `<kind>.json` (everything), `<kind>.md` (the table), `<kind>.png` (ratios vs goals)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from orchestrator.tracking.plots import benchmark_chart


def write_results(
    out_dir: Path, kind: str, machine: dict[str, Any], settings: dict[str, Any], entries: dict[str, Any]
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}.json"
    doc: dict[str, Any] = {"benchmarks": {}}
    if path.exists():  # a partial run (--only) keeps the other entries, each with its own date and load
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            pass
    for name, entry in entries.items():
        entry["machine"], entry["settings"] = machine, settings
        doc["benchmarks"][name] = entry
    doc.update(kind=kind, machine=machine, settings=settings)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = out_dir / f"{kind}.md"
    md.write_text(markdown(doc))
    png = out_dir / f"{kind}.png"
    benchmark_chart(doc, png, _machine_line(doc["machine"]))
    return [path, md, png]


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.4g}"
    return str(x)


def _machine_line(m: dict[str, Any]) -> str:
    parts = [
        m.get("gpu"),
        f"{m.get('cpu')} ({m.get('cores')} cores)",
        f"torch {m.get('torch')}",
        f"transformers {m.get('transformers')}",
        f"trl {m.get('trl')}",
        f"peft {m.get('peft')}",
        m.get("date_utc"),
    ]
    return ", ".join(p for p in parts if p)


_DETAILS = (
    "tokens_per_s",
    "mfu",
    "gpu_peak_mem_gib",
    "samples_per_s",
    "optimizer_state_mib",
    "bytes_written",
    "exit_median_s",
    "split_median_s",
    "driver_peak_rss_mb",
    "children_peak_rss_mb",
    "note",
)


def _details(c: dict[str, Any]) -> str:
    out = []
    for k in _DETAILS:
        if k not in c:
            continue
        v = c[k]
        if isinstance(v, dict):
            v = ", ".join(f"{kk.split('/')[-1]} {_fmt(vv)}" for kk, vv in v.items())
        out.append(f"{k}: {_fmt(v)}")
    return "; ".join(out)


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [
        f"# {doc['kind'].upper()} benchmarks",
        "",
        (
            f"Machine: {_machine_line(m)}. Settings: {s['warmup']} warm-up + {s['repeats']} timed rounds, "
            f"interleaved; {s['threads']} torch thread(s) per contender{' (smoke sizes)' if s['smoke'] else ''}."
        ),
        (
            "Wall-clock medians decide the goals; CPU time (the contender process's own, one thread) is "
            "shown beside them because it does not grow with the load of other processes."
        ),
        "",
        "| benchmark | contender | median (wall) | p25 - p75 | median (CPU) | peak RSS delta MB | details |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in doc["benchmarks"].items():
        if "error" in e:
            lines.append(f"| {name} | (failed) | | | | | see JSON |")
            continue
        unit = e.get("unit", "s")
        for cname, c in e["contenders"].items():
            lines.append(
                f"| {name} | {cname} | {_fmt(c['median_s'])} {unit} | {_fmt(c['p25_s'])} - "
                f"{_fmt(c['p75_s'])} | {_fmt(c.get('cpu_median_s', ''))} | "
                f"{_fmt(c.get('rss_peak_delta_mb', ''))} | {_details(c)} |"
            )
    lines += [
        "",
        "| benchmark | ratio | wall | CPU | goal | met | load avg 1/5/15 min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in doc["benchmarks"].items():
        for r in e.get("ratios", []):
            goal = "" if r["goal"] is None else f"<= {r['goal']}"
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            lines.append(
                f"| {name} | {r['name']} | {_fmt(r['value'])} | {_fmt(r.get('cpu_value', ''))} | {goal} | "
                f"{met} | {'/'.join(str(x) for x in e.get('loadavg_1_5_15', []))} |"
            )
    notes = [(name, n) for name, e in doc["benchmarks"].items() for n in e.get("notes", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {name}: {n}" for name, n in notes]
    return "\n".join(lines) + "\n"
