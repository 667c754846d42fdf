"""Data preparation at scale: time to the first batch and the driver's peak memory.

    python -m benchmarks.data_prep --rows 100000 [--rows 1000000] [--trl] [--num-proc N] [--skip in_memory]

For each size, a generated chat JSONL (`benchmarks/gen_chat.py`) goes through the SFT
data path of `+experiment=sft_tiny` (byte tokenizer, completion-only masks, packing to
`--seq` tokens) up to the first global batch, each contender in a fresh process:

* `in_memory`: `data.cache=false`, the path before prepared data (rows and tokens in
  Python lists in the driver; `--skip in_memory` leaves it out, as at 1M rows, where those
  lists take more memory than a small machine has);
* `prepared_first`: an empty cache: prepared by `datasets.map` in `data.num_proc`
  processes into Arrow files, then memory-mapped;
* `prepared_cached`: the same command again (a cache hit);
* `trl` (`--trl`): TRL `SFTTrainer`'s own preparation of the same rows (chat template with
  assistant masks, as ours, `dataset_num_proc` the same), timed around its constructor.

Reported per contender: wall and CPU seconds (the process and its children), the
process's own peak RSS (the driver's, `ru_maxrss`) and its children's. Results go to
`benchmarks/results/data_prep.{json,md}` with the machine's load average.

In the suite (`python -m benchmarks --only data_prep`, into `results/cpu.{json,md}`) the
four contenders (TRL included) run on `BENCH_DATA_PREP_ROWS` rows (default 100,000), one
round each, the timed span being the data path to the first batch; `--smoke`: 200 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("in_memory", "prepared_first", "prepared_cached")
# ChatML with generation markers, so that TRL computes assistant-only masks as we do.
TRL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _overrides(data: Path, cache_dir: Path, seq: int, num_proc: int, cache: bool) -> list[str]:
    return [
        "+experiment=sft_tiny",
        "logger=console",
        "data=jsonl",
        f"data.source={data}",
        f"data.max_seq_len={seq}",
        f"data.cache={str(cache).lower()}",
        f"data.cache_dir={cache_dir}",
        f"data.num_proc={num_proc}",
    ]


def _ours(overrides: list[str]) -> dict[str, Any]:
    """The SFT stage's data path up to its first global batch."""
    from benchmarks.common import compose_cfg
    from orchestrator.models import build_tokenizer
    from orchestrator.stages.sft import SftStage

    cfg = compose_cfg(overrides)
    tok = build_tokenizer(cfg.model)
    t = time.perf_counter()
    source = SftStage(cfg, tok).source
    batch = source.next()
    tokens = sum(len(r["input_ids"]) for r in batch)
    return {"seconds": time.perf_counter() - t, "rows": len(source.rows), "first_batch_tokens": tokens}


def _trl(data: Path, seq: int, num_proc: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """TRL `SFTTrainer` preparing the same rows (its constructor tokenizes the data set)."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_model, build_tokenizer

    tok = build_tokenizer(ModelConfig(name="t", chat_template=TRL_TEMPLATE))
    model = build_model(ModelConfig(name="t"), None)
    t = time.perf_counter()
    ds = load_dataset(
        "json", data_files=str(data), split="train", cache_dir=str(cache_dir / "hf") if cache_dir else None
    )
    args = SFTConfig(
        output_dir=str(data.parent / "trl_out"),
        max_length=seq,
        assistant_only_loss=True,
        packing=True,
        dataset_num_proc=num_proc if num_proc > 1 else None,
        report_to=[],
        use_cpu=True,  # the preparation is the same on any device; no accelerator is needed for it
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    next(iter(trainer.get_train_dataloader()))
    return {"seconds": time.perf_counter() - t, "rows": len(trainer.train_dataset)}


def child(contender: str, data: Path, cache_dir: Path, seq: int, num_proc: int) -> None:
    """Run one contender in this (fresh) process and print its measurements as JSON."""
    t, c = time.perf_counter(), time.process_time()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if contender == "trl":
        out = _trl(data, seq, num_proc, cache_dir)
    else:
        out = _ours(_overrides(data, cache_dir, seq, num_proc, cache=contender != "in_memory"))
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out.update(
        wall_s=time.perf_counter() - t,
        cpu_s=time.process_time() - c + kids.ru_utime + kids.ru_stime,
        peak_rss_mb=me.ru_maxrss / 1024,
        start_rss_mb=base / 1024,
        children_peak_rss_mb=kids.ru_maxrss / 1024,
    )
    print("RESULT " + json.dumps(out))


def _run_child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(Path(args[2]) / "hf"))
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.data_prep", "--child", *args], env=env, capture_output=True, text=True
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1][7:])


def measure(
    rows: int, work: Path, seq: int, num_proc: int, with_trl: bool, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """All contenders (but `skip`) on `rows` generated rows."""
    from benchmarks.gen_chat import write_chat_jsonl

    data = work / f"chat_{rows}.jsonl"
    if not data.exists():
        write_chat_jsonl(data, rows)
    cache_dir = work / f"cache_{rows}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    out: dict[str, Any] = {"rows": rows, "file_mb": round(data.stat().st_size / 1e6, 1), "contenders": {}}
    for name in CONTENDERS + (("trl",) if with_trl else ()):
        if name in skip:
            continue
        print(f"[{rows} rows] {name} ...", flush=True)
        before = list(os.getloadavg())
        out["contenders"][name] = _run_child([name, str(data), str(cache_dir), str(seq), str(num_proc)])
        out["contenders"][name].update(loadavg_start_1_5_15=before, loadavg_1_5_15=list(os.getloadavg()))
        print(f"  {json.dumps(out['contenders'][name])[:300]}", flush=True)
    return out


SUITE_ROWS = int(os.environ.get("BENCH_DATA_PREP_ROWS", 100_000))
"""Rows of the suite's entry (`python -m benchmarks --only data_prep`; `BENCH_DATA_PREP_ROWS`
sets another size); 1M: this module's CLI."""
SMOKE_ROWS = 200


def _in_process(contender: str, data: Path, cache_dir: Path, seq: int, num_proc: int) -> dict[str, Any]:
    """One contender in this process (`--smoke`: checks the code path, not memory)."""
    t, c = time.perf_counter(), time.process_time()
    if contender == "trl":
        out = _trl(data, seq, num_proc, cache_dir)
    else:
        out = _ours(_overrides(data, cache_dir, seq, num_proc, cache=contender != "in_memory"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(out, wall_s=time.perf_counter() - t, cpu_s=time.process_time() - c, peak_rss_mb=rss)


def data_prep(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    """The suite's entry: SFT data to the first batch, ours (in memory, prepared, cache hit)
    against TRL `SFTTrainer` on the same generated rows, each in a fresh process (one round:
    a round at 100k rows takes minutes); `--smoke`: 200 rows, in this process."""
    from benchmarks.gen_chat import write_chat_jsonl
    from benchmarks.harness import ratio, summarize

    rows, seq = (SMOKE_ROWS, 256) if smoke else (SUITE_ROWS, 1024)
    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = 1 if smoke else procs  # 200 rows: worker processes would only add their start-up
    data, cache_dir = work_dir / f"chat_{rows}.jsonl", work_dir / "cache"
    write_chat_jsonl(data, rows)
    contenders: dict[str, Any] = {}
    for name in (*CONTENDERS, "trl"):
        args = (name, data, cache_dir, seq, procs)
        r = _in_process(*args) if smoke else _run_child([str(a) for a in args])
        if "error" in r:
            raise RuntimeError(f"{name}: {r['error']}")
        contenders[name] = {
            **summarize([r["seconds"]], [r["cpu_s"]]),
            "driver_peak_rss_mb": round(r["peak_rss_mb"]),
            "children_peak_rss_mb": round(r.get("children_peak_rss_mb", 0.0)),
            "process_wall_s": round(r["wall_s"], 2),
            "rows": r["rows"],
        }
    c = contenders
    first, hit, trl = c["prepared_first"]["median_s"], c["prepared_cached"]["median_s"], c["trl"]["median_s"]
    rss = {k: c[k]["driver_peak_rss_mb"] for k in c}
    return {
        "title": f"SFT data to the first batch, {rows} generated chat rows",
        "unit": "s",
        "work": {
            "rows": rows,
            "file_mb": round(data.stat().st_size / 1e6, 1),
            "max_seq_len": seq,
            "num_proc": procs,
            "timed": "from reading the source to the first global batch (imports and model build excluded)",
            "rounds": 1,
        },
        "contenders": contenders,
        "ratios": [
            ratio(
                "prepared_first/trl", first, trl, 1.0, (c["prepared_first"]["cpu_median_s"], c["trl"]["cpu_median_s"])
            ),
            {
                "name": "cache hit to first batch (s)",
                "value": float(f"{hit:.3g}"),  # seconds, 3 significant digits (a smoke-size hit is ~1 ms)
                "goal": 5.0,
                "met": hit <= 5.0,
                "absolute": True,
            },
            ratio("driver peak RSS prepared_first/trl", rss["prepared_first"], rss["trl"], None),
            ratio("driver peak RSS prepared_first/in_memory", rss["prepared_first"], rss["in_memory"], None),
        ],
        "notes": [
            "one round per contender, each in a fresh process (in-process at smoke size); driver peak RSS is the "
            "process's own ru_maxrss, the preparation's worker processes are counted apart (children_peak_rss_mb)"
        ],
    }


def _markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Data preparation (SFT chat rows, first global batch)",
        "",
        f"{doc['machine']}; `data.num_proc={doc['num_proc']}`, max_seq_len {doc['seq']}.",
        "",
        "| rows | contender | to first batch s | process wall s | CPU s | driver peak RSS MB | children peak RSS MB "
        "| load avg (1, 5, 15 min) at start -> end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in doc["sizes"]:
        for name, c in size["contenders"].items():
            if "error" in c:
                lines.append(f"| {size['rows']} | {name} | error | | | | | |")
                continue
            lines.append(
                f"| {size['rows']} | {name} | {c['seconds']:.2f} | {c['wall_s']:.1f} | {c['cpu_s']:.1f} | "
                f"{c['peak_rss_mb']:.0f} | {c['children_peak_rss_mb']:.0f} | "
                + " -> ".join(", ".join(f"{x:.1f}" for x in c[k]) for k in ("loadavg_start_1_5_15", "loadavg_1_5_15"))
                + " |"
            )
    lines.append("")
    for size in doc["sizes"]:
        first, trl = size["contenders"].get("prepared_first", {}), size["contenders"].get("trl", {})
        if "wall_s" in first and "wall_s" in trl:
            lines.append(
                f"{size['rows']} rows, prepared_first/trl: {first['seconds'] / trl['seconds']:.2f}x to the first "
                f"batch, {first['cpu_s'] / trl['cpu_s']:.2f}x CPU (whole processes, imports included)."
            )
    if doc.get("command"):
        lines += ["", f"`{doc['command']}`"]
    lines += [f"\n{n}" for n in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=5, metavar=("CONTENDER", "DATA", "CACHE", "SEQ", "NUM_PROC"))
    ap.add_argument("--rows", type=int, action="append")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--num-proc", type=int, default=0, help="data.num_proc (0: the cores of this machine)")
    ap.add_argument("--trl", action="store_true")
    ap.add_argument("--skip", action="append", default=[], choices=CONTENDERS, help="leave a contender out")
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_data"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = ap.parse_args()
    if a.child:
        name, data, cache_dir, seq, num_proc = a.child
        child(name, Path(data), Path(cache_dir), int(seq), int(num_proc))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    procs = a.num_proc or os.cpu_count() or 1
    doc = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
        "num_proc": procs,
        "seq": a.seq,
        "command": "python -m benchmarks.data_prep " + " ".join(sys.argv[1:]),
        "sizes": [measure(n, a.work.resolve(), a.seq, procs, a.trl, tuple(a.skip)) for n in (a.rows or [100_000])],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "data_prep.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / "data_prep.md").write_text(_markdown(doc))
    print(_markdown(doc))


if __name__ == "__main__":
    main()
