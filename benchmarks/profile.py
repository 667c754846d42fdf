"""`python -m benchmarks.profile`: where ours spends the time the CPU suite says it loses.

Writes results/profile.json (numbers the README's profile notes quote):
* `sft` / `lora`: per-phase CPU time of one step (forward+loss, backward, clip, optimizer)
  of our engine and of a plain loop on the same model and batch, in one process,
  interleaved; and the torch.profiler operators whose self time differs most.
* `checkpoint`: `engine.save`'s parts: get_state_dict, dcp.save with and without fsync,
  and torch.save of the same state dicts.
* `startup`: `py-spy record --subprocesses` of `python -m orchestrator` (2 workers): CPU
  samples per process kind and the share spent importing modules (needs py-spy).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import sft
from benchmarks.common import local_worker, policy_spec_of
from benchmarks.harness import machine_info
from benchmarks.startup import _REPO, _env

PHASES = ("forward_loss", "backward", "clip", "optimizer")


def _ops(fn, steps: int = 5) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}  # ms per step


def step_phases(work: Path, lora: bool, rounds: int = 12) -> dict[str, Any]:
    from orchestrator.data.batching import collate
    from orchestrator.stages.sft import SftStage

    extra = ["method=lora", "method.r=8", "method.alpha=16"] if lora else []
    cfg = sft._cfg(work, sft._work(False), 4, 1, extra)
    stage, tok = sft._rows(cfg)
    worker = local_worker(policy_spec_of(stage))
    e = worker.engine
    model = _plain_model(cfg, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2))
    rows, times = stage.source.rows[: t.micro_batch_size], collections.defaultdict(list)

    def run(who, forward, params_, optim):
        c = [time.process_time()]
        loss = forward()
        c.append(time.process_time())
        loss.backward()
        c.append(time.process_time())
        norm = torch.nn.utils.clip_grad_norm_(params_, t.max_grad_norm, foreach=True)
        bool(torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))  # as the engine
        c.append(time.process_time())
        optim.step()
        optim.zero_grad(set_to_none=True)
        c.append(time.process_time())
        for k, a, b in zip(PHASES, c, c[1:]):
            times[f"{who}/{k}"].append(b - a)

    def ours():
        e.model.train()
        mb = stage.next_step()[0][0][0]
        run("ours", lambda: SftStage.loss(e.model, mb)[0], e._params, e.optimizer)

    def plain():
        b = collate(rows, tok.pad_token_id)

        def fwd():
            logits = model(input_ids=b["input_ids"], use_cache=False).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)

        run("plain", fwd, params, opt)

    for f in (ours, plain, ours, plain):
        f()
    times.clear()
    for i in range(rounds):
        for f in (ours, plain) if i % 2 else (plain, ours):
            f()
    out = {k: round(statistics.median(v) * 1e3, 2) for k, v in sorted(times.items())}  # ms
    for who in ("ours", "plain"):
        out[f"{who}/total"] = round(sum(out[f"{who}/{k}"] for k in PHASES), 2)
    a, b = _ops(ours), _ops(plain)
    diff = sorted(((k, a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b)), key=lambda x: -abs(x[1]))
    out["ops_self_ms_ours_minus_plain"] = {k: round(v, 2) for k, v in diff[:10]}
    worker.shutdown()
    return out


def _plain_model(cfg, lora: bool):
    from orchestrator.models import build_model

    model = build_model(cfg.model, torch.float32).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        m = cfg.method
        model = get_peft_model(
            model,
            LoraConfig(
                r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
        )
    return model


def checkpoint_phases(work: Path, rounds: int = 8) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from orchestrator.engines.fsdp2 import _OPTS

    cfg = sft._cfg(work, sft._work(False), 2, 1)
    stage, _ = sft._rows(cfg)
    worker = local_worker(policy_spec_of(stage))
    worker.train_step(stage.next_step()[0][0])
    e, times = worker.engine, collections.defaultdict(list)
    for i in range(rounds):
        t = [time.perf_counter()]
        msd, osd = get_state_dict(e.model, e.optimizer, options=_OPTS)
        t.append(time.perf_counter())
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(work / f"a{i}"))
        t.append(time.perf_counter())
        dcp.save({"model": msd, "optim": osd}, storage_writer=FileSystemWriter(str(work / f"b{i}"), sync_files=False))
        t.append(time.perf_counter())
        (work / f"c{i}").mkdir()
        torch.save({"model": msd, "optim": osd}, work / f"c{i}" / "state.pt")
        t.append(time.perf_counter())
        for k, a, b in zip(("get_state_dict", "dcp.save", "dcp.save without fsync", "torch.save same dicts"), t, t[1:]):
            times[k].append(b - a)
        for d in "abc":
            shutil.rmtree(work / f"{d}{i}")
    worker.shutdown()
    return {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}  # ms


def startup(work: Path) -> dict[str, Any]:
    if shutil.which("py-spy") is None:
        return {"skipped": "py-spy is not installed"}
    raw, rate = work / "startup.txt", 50
    cmd = [
        "py-spy",
        "record",
        "-r",
        str(rate),
        "--subprocesses",
        "--format",
        "raw",
        "-o",
        str(raw),
        "--",
        sys.executable,
        "-m",
        "orchestrator",
        "+experiment=sft_tiny",
        "logger=console",
        "cluster.num_workers=2",
        "train.max_steps=1",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        "checkpoint.export_hf=false",
        "data.num_samples=256",
        f"run.output_dir={work / 'run'}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=_REPO, env=_env(), capture_output=True, text=True, timeout=600, check=True)
    samples: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        kind = (
            "driver"
            if procs and "-m orchestrator" in procs[-1]
            else "train worker actors"
            if procs and "default_worker" in procs[-1]
            else "ray daemons"
        )
        s = int(n) / rate
        samples[kind]["cpu_s"] += s
        if any("_find_and_load" in f for f in frames):
            samples[kind]["importing_s"] += s
        if any("TrainWorker.build" in f or "train_step" in f for f in frames):
            samples[kind]["build_and_step_s"] += s
    return {
        "wall_s_with_py_spy": round(time.perf_counter() - t0, 2),
        **{k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in samples.items()},
    }


def main() -> int:
    torch.set_num_threads(1)
    out = Path(__file__).resolve().parent / "results"
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    try:
        doc = {"machine": machine_info(), "units": "ms of CPU time per step (sft, lora); ms wall (checkpoint)"}
        for name, fn in (
            ("sft", lambda w: step_phases(w, False)),
            ("lora", lambda w: step_phases(w, True)),
            ("checkpoint", checkpoint_phases),
            ("startup", startup),
        ):
            (work / name).mkdir()
            print(f"[{name}] ...", flush=True)
            doc[name] = fn(work / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(exist_ok=True)
    (out / "profile.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
