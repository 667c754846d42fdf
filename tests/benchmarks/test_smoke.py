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


@pytest.mark.timeout(300)
def test_gpu_check_smoke_runs_each_check_in_its_own_process_and_reports(tmp_path):
    """`--gpu-check --smoke`: real training checks on CPU (gloo), CUDA-only checks skipped, one
    line per check and the report files. A subset keeps it short; every check shares its path."""
    out = tmp_path / "results"
    names = ["train_qlora", "packed_attention", "sft_mfu", "plan_memory"]  # in the order they run
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--gpu-check", "--smoke", "--only", ",".join(names), "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("check ")]
    assert [x.split(":")[0] for x in lines] == [f"check {n}" for n in names]
    doc = json.loads((out / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert status["train_qlora"] == status["sft_mfu"] == "ok", doc["checks"]
    assert status["packed_attention"] == status["plan_memory"] == "skip"  # need CUDA
    qlora = next(c["numbers"] for c in doc["checks"] if c["name"] == "train_qlora")
    assert all(math.isfinite(x) for x in qlora["losses"]) and qlora["losses"][-1] < qlora["losses"][0]
    assert 0 < qlora["params"]["params_trainable"] < qlora["params"]["params_total"]  # adapters only
    mfu = next(c["numbers"] for c in doc["checks"] if c["name"] == "sft_mfu")
    assert mfu["ours"]["tokens_per_s"] > 0 and mfu["hf_loop"]["tokens_per_s"] > 0
    assert any("vLLM" in x for x in doc["not_checked"]) and any("NCCL" in x for x in doc["not_checked"])
    assert "| train_qlora | ok |" in (out / "gpu_check.md").read_text()
    assert (out / "gpu_check.png").read_bytes()[:8] == PNG


def test_gpu_check_installs_a_carried_wheel_of_a_missing_package(tmp_path, monkeypatch):
    """The GPU machine has no registry: a missing package comes from a carried wheel, installed
    into a temporary directory that this process and the checks' children then import from."""
    import zipfile

    sys.path.insert(0, str(REPO))
    from benchmarks import gpu_check

    name = "gpucheck_probe_pkg"
    wheel = tmp_path / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"]))
    monkeypatch.setattr(gpu_check, "CARRIED", {name: name})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert gpu_check.install_wheels(tmp_path) == [name]
    child = subprocess.run(
        [sys.executable, "-c", f"import {name}; print({name}.VALUE)"], capture_output=True, text=True, check=False
    )
    assert child.stdout.strip() == "42", child.stderr
    assert gpu_check.install_wheels(tmp_path) == []  # now importable: nothing to install
