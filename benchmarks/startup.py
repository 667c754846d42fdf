"""Time to first step: the real CLI with 2 workers vs a single in-process PyTorch loop.

Ours: `python -m orchestrator +experiment=sft_tiny` in a fresh subprocess (compose,
validate, start Ray, place 2 worker actors, form the gloo group, build and shard the
model, tokenize the data, one optimizer step), timed from process start until the first
line of metrics.jsonl appears. Logging goes to the console only (no W&B), no
checkpoints or export. The peer is a fresh `python` that imports torch and transformers,
builds the same model (tiny_llama) and data (256 generated examples, packed) in-process,
without Hydra or Ray, and runs one optimizer step on one batch of 8 rows. Each round
starts new processes; both sides find the same warm file cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ratio, summarize

GOAL_S = 15.0
_REPO = Path(__file__).resolve().parents[1]

_PEER = """
import torch, torch.nn.functional as F
from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.batching import BatchSource, collate
from orchestrator.data.sft import tokenize_rows
from orchestrator.data.sources import load_rows
from orchestrator.models import build_model, build_tokenizer
torch.set_num_threads(1)
m = ModelConfig(name="tiny_llama")  # the schema defaults are tiny_llama's sizes
d = DataConfig(source="synthetic:instruct", num_samples=256, max_seq_len=256)
tok = build_tokenizer(m)
rows = BatchSource(tokenize_rows(load_rows(d), tok, d, False), "packed", 256, 8, 0, True, False)
model = build_model(m, torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
b = collate(rows.next(), tok.pad_token_id)
logits = model(input_ids=b["input_ids"]).logits
F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100).backward()
opt.step()
print("FIRST_STEP_DONE", flush=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)  # the local launcher starts its own Ray
    return env


def _ours(run_dir: Path, overrides: list[str], timeout: float) -> dict[str, float]:
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *overrides, f"run.output_dir={run_dir}"],
        cwd=_REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = None
    while p.poll() is None and time.perf_counter() - t0 < timeout:
        if first is None and metrics.exists() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    _, err = p.communicate()
    total = time.perf_counter() - t0
    if p.returncode != 0 or first is None:
        raise RuntimeError(f"python -m orchestrator exited {p.returncode}:\n{err[-3000:]}")
    return {"first_step_s": first, "exit_s": total}


def _peer(timeout: float) -> dict[str, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PEER],
        cwd=_REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if "FIRST_STEP_DONE" not in out.stdout:
        raise RuntimeError(f"in-process loop failed:\n{out.stderr[-3000:]}")
    return {"first_step_s": time.perf_counter() - t0}


def time_to_first_step(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    # --smoke checks the code path with one worker: a second one costs the smoke test seconds of imports.
    overrides = [
        "+experiment=sft_tiny",
        "logger=console",
        f"cluster.num_workers={1 if smoke else 2}",
        "cluster.cpus_per_worker=1",
        "train.max_steps=2",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        "checkpoint.export_hf=false",
        "data.num_samples=256",
    ]
    # Process start-up costs seconds: one round each is enough to see it, three to take a median.
    rounds = 1 if smoke else min(repeats, 3)
    times: dict[str, list[dict[str, float]]] = {"ours": [], "torch_loop": []}
    for r in range(rounds):
        order = ["ours", "torch_loop"] if r % 2 == 0 else ["torch_loop", "ours"]
        for name in order:
            if name == "ours":
                run_dir = work_dir / f"run{r}"
                times[name].append(_ours(run_dir, overrides, timeout=300))
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                times[name].append(_peer(timeout=300))
    out = {name: summarize([t["first_step_s"] for t in ts]) for name, ts in times.items()}
    out["ours"]["exit_median_s"] = summarize([t["exit_s"] for t in times["ours"]])["median_s"]
    first = out["ours"]["median_s"]
    return {
        "title": "Time to first step, `python -m orchestrator`, 2 workers",
        "unit": "s",
        "work": {
            "command": "python -m orchestrator " + " ".join(overrides),
            "workers": 1 if smoke else 2,
            "rounds": rounds,
            "warm_up_rounds": 0,
        },
        "contenders": out,
        "ratios": [
            {
                "name": "ours time to first step (s)",
                "value": round(first, 2),
                "goal": GOAL_S,
                "met": first <= GOAL_S,
                "absolute": True,
            },
            ratio("ours/torch_loop", first, out["torch_loop"]["median_s"], None),
        ],
    }
