"""`python -m orchestrator.report` on two finished tiny runs (SFT and GRPO): valid PNGs with
one line per run that has the metric (counted in the pixels, by the runs' colors), and a
Markdown page linking them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def series_colors(png) -> set[int]:
    """Which of matplotlib's run colors C0..C9 a chart shows (a line's pixels are drawn in its
    exact color; 40 pixels keep antialiased edges of colored lines from counting). C7 is a
    neutral gray that antialiased black text also produces, so it is not looked for: two runs
    use C0 and C1)."""
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    found = set()
    for i in (0, 1, 2, 3, 4, 5, 6, 8, 9):
        rgb = np.round(np.array(colors.to_rgb(f"C{i}")) * 255).astype(int)
        if (np.abs(pixels.astype(int) - rgb).sum(axis=1) == 0).sum() >= 40:
            found.add(i)
    return found


def test_report_overlays_two_runs(sft_run, grpo_run, tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.report", str(sft_run.parent), str(grpo_run), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr  # a directory that is not a run
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.report", str(sft_run), str(grpo_run), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Run 0 (SFT, C0) has loss, lr, grad norm and tokens/s; run 1 (GRPO, C1) has those and the RL charts.
    both, grpo_only = {"loss", "lr", "grad_norm", "tokens_per_s"}, {"reward", "kl", "completion_len", "eval"}
    assert {p.stem for p in out.glob("*.png")} == both | grpo_only
    for name in both:
        assert series_colors(out / f"{name}.png") == {0, 1}, name
    for name in grpo_only:
        assert series_colors(out / f"{name}.png") == {1}, name
    page = (out / "index.md").read_text()
    assert page.startswith("# Runs compared: ") and page.count("](") == len(both | grpo_only)
    assert f"| {sft_run.parent.name}/{sft_run.name} | 4 |" in page
    assert "8 chart(s)" in proc.stdout


def test_single_run_report_rewrites_its_plots(sft_run):
    before = {p.name: p.stat().st_mtime_ns for p in (sft_run / "plots").glob("*.png")}
    assert set(before) == {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"}  # written by the run
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.report", str(sft_run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (sft_run / "plots").glob("*.png")}
    assert set(after) == set(before) and all(after[k] > before[k] for k in before)
    assert series_colors(sft_run / "plots" / "loss.png") == {0}
