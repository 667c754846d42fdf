"""`python -m benchmarks [--only NAME ...] [--repeats N] [--smoke] [--gpu]`: run the suite.

Writes `<out>/cpu.json` (or `gpu.json` with --gpu), a markdown table beside it and a PNG
chart of the ratios, with the machine, the settings and the load average of each
benchmark. Running a subset (`--only`) updates those entries and keeps the others.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_suite() -> Dict[str, Callable[..., Dict[str, Any]]]:
    from benchmarks import checkpoint, grpo, moe, sft, startup

    return {"sft_step": sft.sft_step, "lora_step": sft.lora_step, "grpo_iteration": grpo.grpo_iteration,
            "checkpoint_save": checkpoint.checkpoint_save, "time_to_first_step": startup.time_to_first_step,
            "moe_experts": moe.moe_experts}


def _gpu_suite() -> Dict[str, Callable[..., Dict[str, Any]]]:
    from benchmarks import gpu

    return dict(gpu.SUITE)


def _preload() -> None:
    """Import what the children use once, before forking (they then start instantly)."""
    import datasets
    import peft  # noqa: F401
    import transformers
    import trl  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

    import orchestrator.engines.fsdp2  # noqa: F401
    import orchestrator.rollout.worker  # noqa: F401
    import orchestrator.stages.grpo  # noqa: F401
    import orchestrator.stages.sft  # noqa: F401
    import orchestrator.workers.train_worker  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=[], help="benchmark name (repeatable, or comma-separated)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per contender (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every contender")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the suite runs, not speed")
    p.add_argument("--gpu", action="store_true", help="the GPU suite (skipped without CUDA)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results, "
                   "or benchmarks/results/smoke with --smoke)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = p.parse_args(argv)

    suite = _gpu_suite() if a.gpu else _cpu_suite()
    if a.list:
        print("\n".join(suite))
        return 0
    only = [n for item in a.only for n in item.split(",") if n]
    unknown = [n for n in only if n not in suite]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(suite)}")
    names = only or list(suite)
    out_dir = a.out or (RESULTS / "smoke" if a.smoke else RESULTS)
    warmup = 1 if a.smoke else a.warmup
    repeats = 2 if a.smoke and a.repeats == p.get_default("repeats") else a.repeats

    from benchmarks.harness import gpu_info, machine_info
    from benchmarks.report import write_results

    kind = "gpu" if a.gpu else "cpu"
    machine = machine_info()
    if a.gpu:
        machine.update(gpu_info())
        if "gpu" not in machine and not a.smoke:
            print("GPU suite skipped: no CUDA device (nothing written). `--gpu --smoke` runs its code path on CPU.")
            return 0
        machine.setdefault("gpu", "none: --smoke ran the GPU suite's code path on CPU, tiny model")
    _preload()
    settings = {"warmup": warmup, "repeats": repeats, "threads": a.threads, "smoke": a.smoke}
    entries: Dict[str, Any] = {}
    failed = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        t0 = time.time()
        print(f"[{name}] running ...", flush=True)
        try:
            entry = suite[name](work_dir=work, warmup=warmup, repeats=repeats, threads=a.threads, smoke=a.smoke)
        except Exception:
            failed.append(name)
            entry = {"error": traceback.format_exc()}
            print(entry["error"], file=sys.stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        entry.update(wall_s=round(time.time() - t0, 1), loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()],
                     date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        entries[name] = entry
        print(f"[{name}] done in {entry['wall_s']}s", flush=True)
    paths = write_results(out_dir, kind, machine, settings, entries)
    print("results: " + ", ".join(str(x) for x in paths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
