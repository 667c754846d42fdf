"""`python -m orchestrator.report <run dir> [<run dir> ...] [--out DIR]`: charts of finished
(or running) runs, overlaid for comparison, and a Markdown page linking them.

One run: its charts go to `<run dir>/plots` (what the end of the run writes). Several: one
line per run on each chart, in `--out` (default `runs_report` here). Charts: loss, learning
rate, gradient norm, tokens/s, and for RL reward mean/std, KL, completion length,
held-out accuracy, and the held-out accuracy before and after training
(orchestrator/tracking/plots.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from orchestrator.tracking.plots import RunData, load_run, write_report


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, with its parent's when two names are the same."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: see above)")
    args = parser.parse_args(argv)
    dirs = [d.resolve() for d in args.run_dirs]
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)} (not a run directory?)", file=sys.stderr)
        return 2
    runs: list[RunData] = [load_run(d, label) for d, label in zip(dirs, labels(dirs))]
    out = args.out or (dirs[0] / "plots" if len(dirs) == 1 else Path("runs_report"))
    title = runs[0].label if len(runs) == 1 else "Runs compared: " + ", ".join(r.label for r in runs)
    charts, page = write_report(runs, out, title)
    if not charts:
        print(f"no charts (matplotlib missing, or no metric to chart); wrote {page}", file=sys.stderr)
        return 1
    print(f"{len(charts)} chart(s) ({', '.join(c.stem for c in charts)}) in {out}; page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
