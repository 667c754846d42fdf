"""LoRA weight sync into vLLM: merged weights reloaded in place vs the adapter as a `LoRARequest`.

`python -m benchmarks.lora_sync [--repeats N] [--warmup N] [--prompts P] [--n N] [--completion T]`
writes `benchmarks/results/lora_sync.{json,md,png}`.

One unit of work = what a LoRA GRPO step asks of its rollout worker after the optimizer
step: bring the new policy version into vLLM, then `n` samples for each of `prompts`
prompts. SmolLM2-135M-Instruct (`model=smollm2_135m`), LoRA rank 16 (alpha 32) on every
linear layer as `debug=cpu_real` trains it, fp32, vLLM's CPU build with its engine core
in-process. Before every round both sides move the adapters by the same seeded step (a
stand-in for an optimizer step), so both serve the same policy version.

* **merge** (what `rollout=vllm` does): `Lora.hf_weights` folds W + s B A for every adapted
  layer under the base model's Hugging Face names, and the real `RolloutWorker` pushes them
  with vLLM's in-place reload (`update_weights`), then samples.
* **adapter**: `save_pretrained` of the peft model (the adapter alone: a few MB) into a new
  directory per version, `add_lora` of a `LoRARequest` with a new integer id per version
  (the previous one removed) into an `LLM(..., enable_lora=True, max_lora_rank=16)`, then the
  same sampling with that `lora_request`.

Sync is timed up to the point where the engine holds the new version; rollout is the
`generate` call; the decision is on their sum. Both sides sample with the same per-prompt
seeds, temperature 1, top-p 1, and a fixed length (`min_tokens = max_tokens`: EOS cannot end
a completion), so they generate the same number of tokens. Sanity check: after the last
round, greedy token ids of a few prompts under both paths (same adapter weights), and under
the base model without the adapter (which should differ: the adapter is applied).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
_SPLIT = ("time/sync", "time/rollout")
_CHECK_PROMPTS = 3
_CHECK_TOKENS = 24


def _cfg(work_dir: Path, w: dict[str, Any], threads: int):
    from benchmarks.common import compose_cfg, rollout_overrides

    return compose_cfg(
        [
            "stage=grpo",
            "data=arithmetic",
            "model=smollm2_135m",
            "method=lora",
            "method.r=16",
            "method.alpha=32",
            "method.dropout=0.0",
            "rollout=vllm",
            *rollout_overrides(w, threads, 0.5, work_dir),
        ]
    )


def _setup(cfg, prompts: int):
    """Tokenizer, prompt ids, the LoRA method and the peft model (fp32, adapters seeded)."""
    import torch

    from orchestrator.data.chat import encode_prompt
    from orchestrator.data.prompts import load_prompts
    from orchestrator.methods.lora import Lora
    from orchestrator.models import build_model, build_tokenizer

    tok = build_tokenizer(cfg.model)
    ids = [encode_prompt(tok, p["messages"]) for p in load_prompts(cfg.data)[: max(prompts, _CHECK_PROMPTS)]]
    method = Lora(cfg.method)
    model = method.apply_seeded(build_model(cfg.model, torch.float32), seed=0)
    return tok, ids, method, model


def _step_adapters(model, version: int) -> None:
    """A stand-in for an optimizer step: every adapter weight moves by a seeded amount (lora_B
    starts at zero, so from version 1 on the adapter changes the model's outputs)."""
    import torch

    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.01 if "lora_A" in name else 0.05))


def _sampling_params(eos: int, n: int, temperature: float, max_tokens: int, seed: int, prompts: int) -> list[Any]:
    """The engine's per-prompt vLLM params (`VllmEngine._params`, same seeds), fixed length."""
    from vllm import SamplingParams

    from orchestrator.rollout.vllm import _prompt_seed

    return [
        SamplingParams(
            n=n,
            temperature=temperature,
            top_p=1.0,
            max_tokens=max_tokens,
            min_tokens=max_tokens,
            stop_token_ids=[eos],
            seed=_prompt_seed(seed, i),
            logprobs=0 if temperature > 0 else None,
            detokenize=False,
        )
        for i in range(prompts)
    ]


def merge(ch, cfg, prompts: int) -> dict[str, Any]:
    from benchmarks.common import fix_vllm_length
    from orchestrator.rollout.base import SamplingParams
    from orchestrator.rollout.worker import RolloutWorker

    tok, ids, method, model = _setup(cfg, prompts)
    worker = RolloutWorker(cfg.rollout, cfg.model, 0, tok)
    fix_vllm_length(worker.engine)  # no early EOS, as `_sampling_params` for the adapter
    r = cfg.rollout
    sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
    version = 0
    while ch.next():
        version += 1
        _step_adapters(model, version)
        t = time.perf_counter()
        worker.update_weights(version, method.hf_weights(model.state_dict()))
        t_sync = time.perf_counter() - t
        out = worker.generate(ids[:prompts], sampling, seed=version)
        tokens = sum(len(c["token_ids"]) for c in out["completions"])
        ch.done(**{"time/sync": t_sync, "time/rollout": out["time"]}, tokens=tokens)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=_CHECK_TOKENS)
    check = worker.generate(ids[:_CHECK_PROMPTS], greedy, seed=0)["completions"]
    return {"greedy_ids": [c["token_ids"] for c in check], "version": version}


def adapter(ch, cfg, prompts: int) -> dict[str, Any]:
    import torch
    from vllm import LLM, TokensPrompt
    from vllm.lora.request import LoRARequest

    from orchestrator.rollout.vllm import _llm_kwargs

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    tok, ids, method, model = _setup(cfg, prompts)
    r = cfg.rollout
    kwargs = _llm_kwargs(cfg.model, r, torch.float32, False, False)
    llm = LLM(
        model=cfg.model.pretrained,
        tokenizer=cfg.model.tokenizer or cfg.model.pretrained,
        enable_lora=True,
        max_lora_rank=cfg.method.r,
        max_loras=1,
        **kwargs,
    )
    adapters = Path(tempfile.mkdtemp(prefix="lora-sync-", dir=cfg.run.output_dir))
    token_prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in ids]
    eos = tok.eos_token_id
    version, lora = 0, None
    while ch.next():
        version += 1
        _step_adapters(model, version)
        t = time.perf_counter()
        path = adapters / f"v{version}"
        model.save_pretrained(str(path))
        new = LoRARequest(f"policy-v{version}", version, str(path))
        llm.llm_engine.add_lora(new)
        if lora is not None:
            llm.llm_engine.remove_lora(lora.lora_int_id)
        lora = new
        t_sync = time.perf_counter() - t
        params = _sampling_params(eos, r.n, r.temperature, r.max_new_tokens, version, prompts)
        t = time.perf_counter()
        outs = llm.generate(token_prompts[:prompts], params, use_tqdm=False, lora_request=lora)
        t_roll = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
        ch.done(**{"time/sync": t_sync, "time/rollout": t_roll}, tokens=tokens)
    greedy = _sampling_params(eos, 1, 0.0, _CHECK_TOKENS, 0, _CHECK_PROMPTS)
    for p in greedy:
        p.min_tokens = 0
    check = token_prompts[:_CHECK_PROMPTS]
    with_lora = llm.generate(check, greedy, use_tqdm=False, lora_request=lora)
    base = llm.generate(check, greedy, use_tqdm=False)
    return {
        "greedy_ids": [list(o.outputs[0].token_ids) for o in with_lora],
        "base_greedy_ids": [list(o.outputs[0].token_ids) for o in base],
        "adapter_mbytes": round(sum(f.stat().st_size for f in path.iterdir()) / 2**20, 2) if version else None,
        "version": version,
    }


def lora_sync(work_dir: Path, warmup: int, repeats: int, threads: int, w: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.harness import interleave, median_extra, ratio, result

    cfg = _cfg(work_dir, w, threads)
    res = interleave(
        {name: (fn, {"cfg": cfg, "prompts": w["prompts"]}) for name, fn in (("merge", merge), ("adapter", adapter))},
        warmup,
        repeats,
        threads,
    )
    out: dict[str, dict[str, Any]] = {}
    for name, r in res.items():
        out[name] = result(r)
        out[name]["split_median_s"] = {k: median_extra(r["extras"], k) for k in _SPLIT}
        out[name]["tokens_median"] = median_extra(r["extras"], "tokens")
    merged, adapted = out["merge"].pop("greedy_ids"), out["adapter"].pop("greedy_ids")
    base = out["adapter"].pop("base_greedy_ids")
    check = {
        "prompts": len(merged),
        "tokens": _CHECK_TOKENS,
        "merge_equals_adapter": [a == b for a, b in zip(merged, adapted)],
        "adapter_differs_from_base": [a != b for a, b in zip(adapted, base)],
        "merge": merged,
        "adapter": adapted,
        "base": base,
    }
    split = {k: (out["merge"]["split_median_s"][k], out["adapter"]["split_median_s"][k]) for k in _SPLIT}
    return {
        "title": "LoRA weight sync into vLLM: merged in-place reload vs LoRARequest adapter, SmolLM2-135M",
        "unit": "s/round (sync + rollout)",
        "work": {
            **w,
            "samples_per_round": w["prompts"] * w["n"],
            "model": "SmolLM2-135M-Instruct",
            "lora": "r=16, alpha=32, all linear layers",
            "dtype": "float32",
            "sampling": "temperature 1, top-p 1, min_tokens = max_tokens",
        },
        "contenders": out,
        "greedy_check": check,
        "ratios": [
            ratio("merge/adapter sync + rollout (median)", out["merge"]["median_s"], out["adapter"]["median_s"], None),
            ratio("merge/adapter sync (median)", *split["time/sync"], None),
            ratio("merge/adapter rollout (median)", *split["time/rollout"], None),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per contender")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--completion", type=int, default=64, help="new tokens per sample")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import transformers

    from benchmarks.common import standalone_entry
    from benchmarks.harness import machine_info
    from benchmarks.report import write_results

    transformers.logging.set_verbosity_error()
    import orchestrator.rollout.worker  # noqa: F401  (imported once, before the children fork)

    w = {"prompts": args.prompts, "n": args.n, "completion": args.completion}
    entry = standalone_entry(
        "bench-lora-sync-", lambda work: lora_sync(work, args.warmup, args.repeats, args.threads, w)
    )
    machine = machine_info()
    settings = {"warmup": args.warmup, "repeats": args.repeats, "threads": args.threads, "smoke": False}
    for path in write_results(args.out, "lora_sync", machine, settings, {"lora_sync": entry}):
        print(path)
    for name, c in entry["contenders"].items():
        s = c["split_median_s"]
        print(f"{name}: sync {s['time/sync']:.3f} s + rollout {s['time/rollout']:.3f} s; total {c['median_s']:.3f} s")
    print("greedy check:", {k: entry["greedy_check"][k] for k in ("merge_equals_adapter", "adapter_differs_from_base")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
