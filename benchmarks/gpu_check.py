"""`python -m benchmarks --gpu-check [--smoke]`: one command that checks the GPU paths, without Ray.

Made for a borrowed GPU machine with a short time budget and no package registry: the
wheels it lacks (Hydra, OmegaConf, bitsandbytes, liger-kernel, TRL; `scripts/gpu_wheels.sh`)
travel in `.gpu_wheels/` beside the code and are installed into a temporary directory with
`--no-deps`, so the machine's own torch and transformers stay. Every check runs in its own
subprocess with a timeout (a crash, a hang or an out-of-memory error fails that check only)
and prints one line: `check <name>: ok|FAIL|skip <numbers> — <what it proves>`. The results
go to `benchmarks/results/gpu_check.{json,md,png}`.

`--smoke` runs the same checks on CPU at tiny sizes over gloo, skipping those that need CUDA,
so that CI keeps this command from rotting (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WHEELS = REPO / ".gpu_wheels"
# Import name -> the wheel's distribution name, installed from WHEELS when the machine lacks it:
# Hydra and OmegaConf compose the configs, datasets (and what it imports) backs the data
# pipeline's cache, bitsandbytes is method=qlora, liger-kernel is train.kernels=liger, TRL is
# the SFTTrainer contender of `--gpu`.
CARRIED = {
    "hydra": "hydra_core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4_python3_runtime",
    "bitsandbytes": "bitsandbytes",
    "liger_kernel": "liger_kernel",
    "trl": "trl",
    "datasets": "datasets",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "xxhash": "xxhash",
    "fsspec": "fsspec",
    "pandas": "pandas",
    "requests": "requests",
    "urllib3": "urllib3",
    "idna": "idna",
    "certifi": "certifi",
    "charset_normalizer": "charset_normalizer",
}
NOT_CHECKED = [
    "vLLM rollouts on GPU (vLLM is not installed there and its wheels exceed what the tree carries)",
    "multi-GPU NCCL collectives (one GPU: every process group here has one rank)",
    "DeepSpeed ZeRO-3 on GPU (not installed there)",
]


class Skip(Exception):
    """A check that cannot run on this machine (no CUDA, a package missing)."""


@dataclass
class Check:
    name: str
    fn: Callable[[bool, Path], dict[str, Any]]
    proves: str
    timeout_s: int


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device():
    import torch

    return torch.device("cuda", 0) if _cuda() else torch.device("cpu")


def _peak_mem_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if _cuda() else None


# ---------------------------------------------------------------- training through the engine
def _model_overrides(smoke: bool) -> list[str]:
    """A random-init Qwen2-shaped model with the byte tokenizer's vocabulary: Qwen2.5-0.5B's
    width and a quarter of its depth on GPU (~0.1B parameters), tiny on CPU."""
    if smoke:
        sizes = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    else:
        sizes = dict(hidden_size=896, intermediate_size=4864, num_layers=6, num_heads=14, num_kv_heads=2)
    return ["model=tiny_qwen2", *(f"model.{k}={v}" for k, v in sizes.items())]


def _sft_cfg(work: Path, smoke: bool, seq: int, batch: int, micro: int, extra: list[str]):
    from benchmarks.common import compose_cfg, sft_overrides, write_long_rows

    data = write_long_rows(work / "rows.jsonl", n=batch * 4, seq=seq)
    device = (
        ["cluster.gpus_per_worker=0", "backend.mixed_precision=fp32"]
        if not _cuda()
        else ["cluster.gpus_per_worker=1", "backend.mixed_precision=bf16"]
    )
    # shard_single_rank: FSDP2's fully_shard and its bf16 MixedPrecisionPolicy run on the one rank.
    overrides = [*device, "backend.shard_single_rank=true", *extra]
    return compose_cfg(sft_overrides(data, seq, batch, _model_overrides(smoke), work, 1, overrides, micro=micro))


def _train(cfg, steps: int) -> dict[str, Any]:
    """`steps` optimizer steps of the SFT stage through a TrainWorker on a one-rank process
    group (NCCL on GPU, gloo on CPU): per-step mean token loss, tokens/s after the first step
    and peak GPU memory."""
    import torch

    from benchmarks.common import local_worker, policy_spec_of
    from benchmarks.sft import _rows

    stage, _ = _rows(cfg)
    worker = local_worker(policy_spec_of(stage))
    losses, times, tokens = [], [], 0
    for i in range(steps):
        per_rank, info = stage.next_step()
        if _cuda():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = worker.train_step(per_rank[0])
        if _cuda():
            torch.cuda.synchronize()
        if i > 0:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - t0)
            tokens += info["tokens"]
        losses.append(out["nll_sum"] / info["targets"])
    params = dict(worker.engine.param_counts)
    worker.shutdown()
    return {
        "losses": [round(x, 4) for x in losses],
        "tokens_per_s": round(tokens / sum(times), 1) if times else None,
        "peak_mem_gib": _peak_mem_gib(),
        "params": params,
    }


def _assert_trains(r: dict[str, Any]) -> None:
    losses = r["losses"]
    assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
    assert sum(losses[-2:]) / 2 < losses[0], f"loss did not fall: {losses}"


def _train_method(method: str, smoke: bool, work: Path) -> dict[str, Any]:
    extra = {
        "full": ["train.lr=3e-4"],
        "lora": ["method=lora", "method.dropout=0.0", "method.target_modules=[all-linear]", "train.lr=2e-3"],
        "qlora": ["method=qlora", "method.dropout=0.0", "train.lr=2e-3"],
    }[method]
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes missing")
    seq, batch = (64, 4) if smoke else (2048, 8)
    cfg = _sft_cfg(work, smoke, seq, batch, micro=batch if smoke else 4, extra=extra)
    r = _train(cfg, steps=4 if smoke else 8)
    _assert_trains(r)
    return r


def check_train_full(smoke: bool, work: Path) -> dict[str, Any]:
    return _train_method("full", smoke, work)


def check_train_lora(smoke: bool, work: Path) -> dict[str, Any]:
    return _train_method("lora", smoke, work)


def check_train_qlora(smoke: bool, work: Path) -> dict[str, Any]:
    return _train_method("qlora", smoke, work)


def check_compile(smoke: bool, work: Path) -> dict[str, Any]:
    """The same steps eager and with `train.compile=true` (every decoder block compiled, then
    sharded): per-step losses must agree (bf16 compute on GPU: to 2%)."""
    if smoke:
        raise Skip("compile on CPU is covered by tests/models/test_fast_paths.py")
    runs = {}
    for compile in (False, True):
        (work / str(compile)).mkdir()
        cfg = _sft_cfg(work / str(compile), smoke, 1024, 4, 4, [f"train.compile={str(compile).lower()}"])
        runs[compile] = _train(cfg, steps=5)
    eager, compiled = runs[False]["losses"], runs[True]["losses"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    assert rel < 2e-2, f"compiled {compiled} vs eager {eager}"
    _assert_trains(runs[True])
    return {
        "max_rel_loss_diff": round(rel, 5),
        "tokens_per_s_eager": runs[False]["tokens_per_s"],
        "tokens_per_s_compiled": runs[True]["tokens_per_s"],
        "losses_eager": eager,
        "losses_compiled": compiled,
    }


def check_plan_memory(smoke: bool, work: Path) -> dict[str, Any]:
    """`orchestrator.plan`'s predicted device memory for the full-SFT config of `train_full`
    against `torch.cuda.max_memory_allocated` after its steps."""
    if not _cuda():
        raise Skip("needs CUDA (CPU has no max_memory_allocated)")
    from orchestrator.plan import estimate

    seq, batch = 2048, 8
    cfg = _sft_cfg(work, smoke, seq, batch, micro=4, extra=["train.lr=3e-4", "plan.device=auto"])
    plan = estimate(cfg)
    measured = _train(cfg, steps=3)["peak_mem_gib"]
    # What the training role holds on the device; the plan's headroom (CUDA context, allocator
    # slack) is outside what max_memory_allocated counts.
    on_device = [c for c in plan.components if c.where == "device" and not c.role.startswith("rollout")]
    components = {f"{c.role}/{c.name}": round(c.bytes / 2**30, 2) for c in on_device}
    predicted_gib = round(sum(c.bytes for c in on_device) / 2**30, 2)
    return {
        "predicted_gib": predicted_gib,
        "plan_device_total_gib": round(plan.device_total / 2**30, 2),
        "measured_peak_gib": measured,
        "predicted_over_measured": round(predicted_gib / measured, 3),
        "components_gib": components,
    }


# ---------------------------------------------------------------- throughput vs a plain loop
def _hf_loop(cfg, steps: int) -> dict[str, Any]:
    """What a user writes by hand: the same model and rows, bf16 autocast over fp32 weights,
    cross-entropy on the full logits, clip, fused AdamW; one optimizer step per batch."""
    import torch
    import torch.nn.functional as F

    from benchmarks.sft import _rows
    from orchestrator.data.batching import collate
    from orchestrator.data.sft import IGNORE
    from orchestrator.models import build_model

    stage, tok = _rows(cfg)
    rows, b, micro, t = stage.source.rows, cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train
    device = _device()
    model = build_model(cfg.model, torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, fused=device.type == "cuda")
    times, tokens = [], 0
    for step in range(steps):
        start = (step * b) % max(1, len(rows) - b + 1)
        batch = collate(rows[start : start + b], tok.pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, b, micro):
            ids, labels = batch["input_ids"][i : i + micro].to(device), batch["labels"][i : i + micro].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
            (loss * micro / b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t0)
            tokens += int(batch["input_ids"].numel())
    return {"tokens_per_s": round(tokens / sum(times), 1), "peak_mem_gib": _peak_mem_gib()}


def _trl(cfg, steps: int, smoke: bool) -> dict[str, Any] | str:
    """TRL's SFTTrainer on the same rows, timed by the suite's harness in a spawned process
    (its own CUDA context and peak): its numbers, or why it did not run."""
    if smoke:
        return "not in --smoke (the CPU suite's sft_step runs TRL)"
    if importlib.util.find_spec("trl") is None:
        return "trl missing"
    from benchmarks import sft
    from benchmarks.harness import interleave, result

    try:
        r = interleave({"trl": (sft.trl, {"cfg": cfg, "lora": False})}, 1, steps - 1, 1, start_method="spawn")
    except Exception as e:  # noqa: BLE001 - a TRL failure must not lose our numbers
        return f"TRL failed: {type(e).__name__}: {e}"[:300]
    c = result(r["trl"])
    tokens = cfg.data.max_seq_len * cfg.train.global_batch_size
    return {
        "tokens_per_s": round(tokens / c["median_s"], 1),
        "median_s": c["median_s"],
        "peak_mem_gib": c.get("gpu_peak_mem_gib"),
    }


def check_sft_mfu(smoke: bool, work: Path) -> dict[str, Any]:
    """Full SFT of the Qwen2.5-0.5B shape at seq 4096 (4 rows per step, micro-batch 1): ours
    (the engine) vs a plain HF loop and, when TRL imports, TRL's SFTTrainer (padded rows, as
    `benchmarks.sft.trl` sets it up); MFU from `benchmarks.gpu.flops_per_token`."""
    import gc

    import torch

    from benchmarks.common import compose_cfg, sft_overrides, write_long_rows
    from benchmarks.gpu import PEAK_BF16, SHAPES, flops_per_token, prepare_model
    from benchmarks.gpu import _model_overrides as pretrained_overrides

    shape = "tiny" if smoke else "qwen2.5-0.5b"
    s = SHAPES[shape]
    seq, batch, steps = (64, 2, 3) if smoke else (4096, 4, 6)
    # Saved once with random init (and the full Qwen vocabulary), loaded by both contenders.
    model = pretrained_overrides(prepare_model(shape, work / "models", _cuda()), shape, "float32")
    data = write_long_rows(work / "rows.jsonl", n=batch * (steps + 1), seq=seq)
    device = ["cluster.gpus_per_worker=1", "backend.mixed_precision=bf16"] if _cuda() else ["cluster.gpus_per_worker=0"]
    cfg = compose_cfg(sft_overrides(data, seq, batch, model, work, 1, [*device, "train.lr=1e-4"], micro=1))
    ours = _train(cfg, steps)
    if _cuda():  # our model and optimizer are gone: the loop's peak is its own
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loop = _hf_loop(cfg, steps)
    out = {"seq": seq, "rows_per_step": batch, "ours": ours, "hf_loop": loop}
    if _cuda():
        del loop  # (its numbers stay in `out`)
        gc.collect()
        torch.cuda.empty_cache()
    trl = _trl(cfg, steps, smoke)
    if isinstance(trl, dict):
        out["trl"] = trl
        out["ours_over_trl_tokens_per_s"] = round(ours["tokens_per_s"] / trl["tokens_per_s"], 3)
    else:
        out["trl_skipped"] = trl
    name = torch.cuda.get_device_name(0) if _cuda() else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    for c in (ours, out["hf_loop"], *([trl] if isinstance(trl, dict) else [])):
        if peak:
            c["mfu"] = round(flops_per_token(s, seq) * c["tokens_per_s"] / peak, 4)
    out["ours_over_hf_loop_tokens_per_s"] = round(ours["tokens_per_s"] / loop["tokens_per_s"], 3)
    # Recorded, not asserted: this check is about speed (train_* assert that steps train), and a
    # few steps at this learning rate may not yet lower a random model's loss.
    out["ours_loss_fell"] = ours["losses"][-1] < ours["losses"][0]
    return out


# ---------------------------------------------------------------- the GPU tests, through pytest
def _pytest(selector: str) -> dict[str, Any]:
    if not _cuda():
        raise Skip("needs CUDA")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "-k",
            selector,
            "tests/models/test_fast_paths.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    if proc.returncode == 5 or (" passed" not in tail and " skipped" in tail):
        raise Skip(f"pytest: {tail}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return {"pytest": tail}


def check_fused_ce(smoke: bool, work: Path) -> dict[str, Any]:
    if importlib.util.find_spec("liger_kernel") is None:
        raise Skip("liger-kernel missing")
    return _pytest("liger_fused_ce")


def check_packed_attention(smoke: bool, work: Path) -> dict[str, Any]:
    return _pytest("packed_rows_through_the_auto_gpu_kernel")


CHECKS = [
    Check(
        "train_full",
        check_train_full,
        "FSDP2 (one rank) trains a Qwen2-shaped model in bf16: the loss falls",
        240,
    ),
    Check("train_lora", check_train_lora, "LoRA on every linear layer trains under FSDP2 bf16", 240),
    Check("train_qlora", check_train_qlora, "QLoRA (bitsandbytes NF4 base) trains under FSDP2 bf16", 240),
    Check("fused_ce", check_fused_ce, "Liger fused linear CE gives the chunked path's log-probs and gradients", 240),
    Check("packed_attention", check_packed_attention, "packed rows through the auto GPU kernel equal unpacked", 180),
    Check("compile", check_compile, "train.compile=true follows the eager losses on GPU", 420),
    Check(
        "sft_mfu",
        check_sft_mfu,
        "0.5B-shaped SFT, seq 4096: our tokens/s and MFU vs a plain HF loop and TRL (if it imports)",
        420,
    ),
    Check("plan_memory", check_plan_memory, "the planner's memory prediction vs torch.cuda.max_memory_allocated", 240),
]


# ---------------------------------------------------------------- wheels, children, report
def install_wheels(wheels: Path = WHEELS) -> list[str]:
    """Install the carried wheels of missing packages into a temporary directory (no deps,
    no index: the machine's torch and transformers stay) and put it first on sys.path and
    PYTHONPATH, so the check's children see it too. Returns the packages now importable; a
    wheel that does not install (another Python) is reported and left out."""
    by_dist = {w.name.split("-")[0].lower(): w for w in sorted(wheels.glob("*.whl"))} if wheels.is_dir() else {}
    missing = [m for m in CARRIED if importlib.util.find_spec(m) is None and CARRIED[m] in by_dist]
    if not missing:
        return []
    target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    for module in missing:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
        proc = subprocess.run([*pip, str(by_dist[CARRIED[module]])], capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"wheel {by_dist[CARRIED[module]].name} did not install: {proc.stderr.strip()[-200:]}")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return [m for m in missing if importlib.util.find_spec(m) is not None]


def _run_one(name: str, smoke: bool, out: Path) -> None:
    """Child: run one check, write {status, numbers | note} to `out`."""
    check = next(c for c in CHECKS if c.name == name)
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    try:
        doc = {"status": "ok", "numbers": check.fn(smoke, work)}
    except Skip as e:
        doc = {"status": "skip", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - the parent reports it as this check's failure
        import traceback

        doc = {"status": "FAIL", "note": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()}
    out.write_text(json.dumps(doc, default=str))


def _summary(numbers: dict[str, Any]) -> str:
    """The few numbers worth a line: flat scalars, nested `tokens_per_s`/`mfu`/`peak_mem_gib`."""
    parts = []
    for k, v in numbers.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{k}={v}")
        elif isinstance(v, dict):
            parts += [f"{k}.{q}={v[q]}" for q in ("tokens_per_s", "mfu", "peak_mem_gib") if v.get(q) is not None]
        elif isinstance(v, list) and k == "losses":
            parts.append(f"loss {v[0]}->{v[-1]}")
        elif isinstance(v, str) and k == "pytest":
            parts.append(v)
    return " ".join(parts)


def run_check(check: Check, smoke: bool, budget_s: float = math.inf) -> dict[str, Any]:
    """Run one check in a child process, for at most its own timeout or `budget_s`."""
    timeout = int(min(check.timeout_s, budget_s))
    if timeout < 20:
        doc = {"status": "skip", "note": "no time left in --budget-s"}
        print(f"check {check.name}: skip {doc['note']} — {check.proves}", flush=True)
        return dict(doc, name=check.name, proves=check.proves, wall_s=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--one", check.name, "--result", str(out)]
        t0 = time.time()
        try:
            proc = subprocess.run(
                [*cmd, *(["--smoke"] if smoke else [])],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if out.exists():
                doc = json.loads(out.read_text())
            else:  # killed (out of memory, a segfault in a kernel) before it could write
                doc = {"status": "FAIL", "note": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
        except subprocess.TimeoutExpired:
            doc = {"status": "FAIL", "note": f"timed out after {timeout}s"}
    doc.update(name=check.name, proves=check.proves, wall_s=round(time.time() - t0, 1))
    detail = _summary(doc.get("numbers", {})) if doc["status"] == "ok" else doc.get("note", "")
    print(f"check {check.name}: {doc['status']} {detail} — {check.proves}", flush=True)
    return doc


def write_report(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "gpu_check.json", out_dir / "gpu_check.md"]
    paths[0].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    lines = [
        "# GPU check",
        "",
        f"{doc['machine']}; {doc['date_utc']}; smoke={doc['smoke']}; wheels installed: "
        f"{', '.join(doc['installed']) or 'none'}",
        "",
        "| check | status | numbers | proves |",
        "|---|---|---|---|",
    ]
    for c in doc["checks"]:
        detail = _summary(c.get("numbers", {})) if c["status"] == "ok" else c.get("note", "")
        lines.append(f"| {c['name']} | {c['status']} | {detail.replace('|', '/')} | {c['proves']} |")
    lines += ["", "Not checked on this machine:", "", *(f"- {x}" for x in doc["not_checked"]), ""]
    paths[1].write_text("\n".join(lines))
    if importlib.util.find_spec("matplotlib") is not None:
        paths.append(_chart(doc, out_dir / "gpu_check.png"))
    return paths


def _chart(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [
        (c["name"], c["numbers"]["tokens_per_s"]) for c in doc["checks"] if c.get("numbers", {}).get("tokens_per_s")
    ]
    mfu = next((c["numbers"] for c in doc["checks"] if c["name"] == "sft_mfu" and c["status"] == "ok"), None)
    if mfu:
        runs += [("sft_mfu ours", mfu["ours"]["tokens_per_s"]), ("sft_mfu hf_loop", mfu["hf_loop"]["tokens_per_s"])]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * max(1, len(runs))))
    ax.barh([n for n, _ in runs], [v for _, v in runs])
    ax.set_xlabel("tokens/s")
    ax.set_title(f"GPU check: {doc['machine']}" + (" (smoke, CPU)" if doc["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(smoke: bool, out_dir: Path | None = None, only: list[str] | None = None, budget_s: float = 540) -> int:
    """Run every check (or `only` those) within `budget_s` seconds in all, print one line each and
    rewrite the report after each (a run killed from outside keeps what finished). Returns 0 when
    no check failed."""
    t0 = time.time()
    import torch

    if not torch.cuda.is_available() and not smoke:
        print("GPU check skipped: no CUDA device (nothing written). `--gpu-check --smoke` runs it on CPU.")
        return 0
    # The CPU smoke run tests the checks, not the machine: it installs nothing.
    installed = [] if smoke else install_wheels()
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    print(f"gpu check on {machine}, torch {torch.__version__}; wheels installed: {installed or 'none'}", flush=True)
    not_checked = list(NOT_CHECKED)
    if importlib.util.find_spec("deepspeed") is not None:
        not_checked[2] = "DeepSpeed ZeRO-3 on GPU (deepspeed imports here, but this check does not run it)"
    doc = {
        "machine": machine,
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "smoke": smoke,
        "installed": installed,
        "checks": [],
        "not_checked": not_checked,
    }
    out_dir = out_dir or (RESULTS / "smoke" if smoke else RESULTS)
    paths: list[Path] = []
    for check in CHECKS:
        if not only or check.name in only:
            doc["checks"].append(run_check(check, smoke, budget_s - (time.time() - t0)))
            paths = write_report(doc, out_dir)
    print("results: " + ", ".join(map(str, paths)))
    return 1 if any(c["status"] == "FAIL" for c in doc["checks"]) else 0


if __name__ == "__main__":  # a check's child process
    p = argparse.ArgumentParser()
    p.add_argument("--one", required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    _run_one(a.one, a.smoke, a.result)
