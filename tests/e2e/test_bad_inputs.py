"""Bad inputs end in one clear message and a non-zero exit before any worker starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **(env or {})),
    )


def test_unknown_model_offline_names_the_model_and_the_offline_option(tmp_path):
    out = _run(
        "+experiment=sft_tiny",
        "model.pretrained=acme/does-not-exist-7b",
        f"run.output_dir={tmp_path}",
        "logger=console",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 1
    assert "acme/does-not-exist-7b" in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_malformed_row_stops_before_workers_with_file_and_row(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + "{broken\n")
    out = _run("+experiment=sft_tiny", f"data.source={data}", f"run.output_dir={tmp_path / 'run'}", "logger=console")
    assert out.returncode == 1
    assert f"{data}:row 2: invalid JSON" in out.stderr and "data.on_bad_rows=skip" in out.stderr
    assert "worker group" not in out.stderr
