"""The benchmark suite runs end to end at tiny sizes and writes well-formed results.

This keeps `python -m benchmarks` from rotting. It never asserts speed: on a shared CI
machine timings say nothing, and the suite itself reports them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _check(out: Path, kind: str, names) -> None:
    doc = json.loads((out / f"{kind}.json").read_text())
    for key in ("cpu", "cores", "torch", "date_utc", "loadavg_1_5_15"):
        assert key in doc["machine"], key
    assert doc["settings"]["smoke"] is True
    assert set(doc["benchmarks"]) == set(names)
    for name, entry in doc["benchmarks"].items():
        assert "error" not in entry, f"{name}: {entry.get('error')}"
        assert entry["contenders"] and entry["ratios"], name
        for cname, c in entry["contenders"].items():
            assert c["median_s"] > 0 and c["n"] == len(c["times_s"]) >= 1, (name, cname)
        for r in entry["ratios"]:
            assert math.isfinite(r["value"]) and r["value"] > 0, (name, r)
        assert len(entry["loadavg_1_5_15"]) == 3
    md = (out / f"{kind}.md").read_text()
    assert all(f"| {name} |" in md for name in names)
    assert (out / f"{kind}.png").read_bytes()[:8] == PNG


@pytest.mark.timeout(960)
def test_suite_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--repeats", "1", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # the first test of a fresh install also pays for cold imports
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    sys.path.insert(0, str(REPO))
    from benchmarks.run import _cpu_suite, _gpu_suite

    _check(out, "cpu", _cpu_suite())
    _check(out, "gpu", _gpu_suite())


def test_list_and_bad_name():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0 and "sft_step" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nope"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr
