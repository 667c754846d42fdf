"""Rollout engines side by side: `rollout=vllm` vs `rollout=hf` on the same prompts and samples.

One unit of work = what a full-fine-tuning GRPO step asks of its rollout worker: a weight
sync of the whole model under Hugging Face names, then `n` samples for each of `prompts`
prompts (temperature 1, top-p 1, up to `completion` new tokens). Both sides are the real
`RolloutWorker` (the Ray actor's class, called directly in the contender's process) with
the engine the `rollout` config group names; the same locally built model (same config and
init seed, fp32), the same arithmetic prompts encoded by our chat template, the same seed
per round. vLLM runs its CPU build with its engine core in-process (as in the actor).

Sampled lengths differ between the engines (different random streams; EOS can be drawn),
so the ratio is the wall time per generated token; the times per round and the sync and
rollout medians are reported beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import compose_cfg, rollout_overrides
from benchmarks.harness import interleave, median_extra, ratio, result


def contender(ch, cfg, prompts: int) -> dict[str, Any]:
    from orchestrator.data.chat import encode_prompt
    from orchestrator.data.prompts import load_prompts
    from orchestrator.models import build_model, build_tokenizer, resolve_dtype
    from orchestrator.rollout.base import SamplingParams
    from orchestrator.rollout.worker import RolloutWorker

    tok = build_tokenizer(cfg.model)
    ids = [encode_prompt(tok, p["messages"]) for p in load_prompts(cfg.data)[:prompts]]
    state = build_model(cfg.model, resolve_dtype(cfg.model, False)).state_dict()
    worker = RolloutWorker(cfg.rollout, cfg.model, 0, tok)
    r = cfg.rollout
    sampling = SamplingParams(
        n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens
    )
    rnd = 0
    while ch.next():
        rnd += 1
        t = time.perf_counter()
        worker.update_weights(rnd, state)
        t_sync = time.perf_counter() - t
        out = worker.generate(ids, sampling, seed=rnd)
        tokens = sum(len(c["token_ids"]) for c in out["completions"])
        ch.done(**{"time/sync": t_sync, "time/rollout": out["time"]}, tokens=tokens)
    return {}


def rollout_engines(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = (
        {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "prompts": 2, "n": 2, "completion": 4}
        if smoke
        else {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "prompts": 8, "n": 8, "completion": 64}
    )
    common = [
        "stage=grpo",
        "data=arithmetic",
        "model=tiny_llama",
        f"model.hidden_size={w['hidden']}",
        f"model.intermediate_size={w['intermediate']}",
        f"model.num_layers={w['layers']}",
        f"model.num_heads={w['heads']}",
        f"model.num_kv_heads={w['heads']}",
        *rollout_overrides(w, threads, 0.25, work_dir),
    ]
    cfgs = {e: compose_cfg([*common, f"rollout={e}"]) for e in ("vllm", "hf")}
    res = interleave(
        {e: (contender, {"cfg": c, "prompts": w["prompts"]}) for e, c in cfgs.items()}, warmup, repeats, threads
    )
    out: dict[str, dict[str, Any]] = {}
    per_token: dict[str, tuple[float, float]] = {}  # (wall, CPU) seconds per generated token
    for name, r in res.items():
        out[name] = result(r)
        out[name]["split_median_s"] = {k: median_extra(r["extras"], k) for k in ("time/sync", "time/rollout")}
        tokens = sum(e["tokens"] for e in r["extras"])
        out[name]["tokens_per_s"] = round(tokens / sum(r["times"]), 1)
        out[name]["tokens_median"] = median_extra(r["extras"], "tokens")
        per_token[name] = (sum(r["times"]) / tokens, sum(r["cpu_times"]) / tokens)
    return {
        "title": "Rollout: weight sync + sampling, vLLM (CPU build) vs HF generate, tiny Llama",
        "unit": "s/round",
        "work": {**w, "samples_per_round": w["prompts"] * w["n"], "dtype": "float32"},
        "contenders": out,
        "ratios": [
            ratio(
                "vllm/hf time per generated token",
                per_token["vllm"][0],
                per_token["hf"][0],
                None,
                cpu=(per_token["vllm"][1], per_token["hf"][1]),
            ),
            ratio(
                "vllm/hf rollout (median)",
                out["vllm"]["split_median_s"]["time/rollout"],
                out["hf"]["split_median_s"]["time/rollout"],
                None,
            ),
            ratio(
                "vllm/hf weight sync (median)",
                out["vllm"]["split_median_s"]["time/sync"],
                out["hf"]["split_median_s"]["time/sync"],
                None,
            ),
        ],
    }
