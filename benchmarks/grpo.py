"""GRPO iteration: ours vs TRL `GRPOTrainer`, both generating with HF `generate`.

One iteration = sample `n` completions for each of `prompts` prompts, score them with the
same reward function (`math_verify`), group advantages, one clipped policy-gradient
optimizer step, and (ours) the weight sync to the rollout copy. Identical work: the same
model and init, the same prompts in the same order (no shuffling on either side), the
same sampling (temperature 1, no top-k/top-p) and a fixed completion length (EOS and pad
suppressed, `min_new_tokens = max_new_tokens` on both sides), no KL term (so no reference
model), one iteration per batch (so no old-log-prob pass), fp32, logging off.

Ours runs the real `GrpoStage.step` with its TrainWorker (built from the stage's policy
role spec) and a RolloutWorker wrapping the `hf` rollout engine in-process (the Ray
actors' classes, called directly), the weight sync in Hugging Face names, and its reward
process pool; the time split comes from the stage's own `time/*` metrics. TRL's split is
measured by wrapping its `_generate` and `_calculate_rewards` methods with timers.

`python -m benchmarks.grpo` (standalone, not in the suite) runs the same comparison with ours
on `rollout=vllm` (vLLM's CPU build, in-process; fixed length there by `min_tokens` and a
pad logit bias) against TRL's default HF generation: on the tiny Llama (full fine-tuning),
and on SmolLM2-135M-Instruct (`model=smollm2_135m`) with LoRA r=16 on every linear layer on
both sides (ours syncs the merged weights), 4 prompts x 8 samples x 32 tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LocalRollout,
    channel_callback,
    compose_cfg,
    fix_vllm_length,
    local_roles,
    local_worker,
    policy_spec_of,
    quiet,
    trl_args,
)
from benchmarks.harness import interleave, median_extra, result, time_ratio

_SPLIT = ("time/rollout", "time/reward", "time/old_logprob", "time/train", "time/sync")


def _fixed_length(engine, cfg, tok) -> None:
    """Every completion exactly max_new_tokens long: EOS and pad can never be sampled. `hf`:
    the model's generation config; `vllm`: each request's params (`min_tokens` holds EOS and
    the stop ids back, a large negative logit bias the pad token)."""
    if hasattr(engine, "llm"):  # VllmEngine
        fix_vllm_length(engine, tok.pad_token_id)
        return
    g = engine.model.generation_config
    g.min_new_tokens = cfg.rollout.max_new_tokens
    g.suppress_tokens = [tok.pad_token_id]


def ours(ch, cfg) -> dict[str, Any]:
    from orchestrator.models import build_tokenizer
    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.stages.grpo import GrpoStage

    tok = build_tokenizer(cfg.model)
    stage = GrpoStage(cfg, tok)
    spec = policy_spec_of(stage)
    roles = local_roles(spec, local_worker(spec, stage.total_steps))
    # What GrpoStage.setup does, minus Ray: the rollout engine the `rollout` group names,
    # serving the policy's model, and the initial weight sync (Hugging Face names).
    rollout = RolloutWorker(cfg.rollout, cfg.model, 0, tok)
    _fixed_length(rollout.engine, cfg, tok)
    stage.rollout = LocalRollout(rollout)
    stage.rollout.sync(stage.version, roles.policy.call("inference_state")[0])
    step = 0
    try:
        while ch.next():
            step += 1
            m = stage.step(roles, step)
            ch.done(**{k: m[k] for k in _SPLIT if k in m}, completion_len=m["completion_len"])
    finally:
        stage.close()
    return {}


def trl(ch, cfg) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from orchestrator.data.prompts import load_prompts
    from orchestrator.models import build_model, build_tokenizer, master_dtype
    from orchestrator.rewards import resolve

    g, r = cfg.stage, cfg.rollout
    tok = build_tokenizer(cfg.model)
    data = Dataset.from_list([{"prompt": p["messages"], "answer": p["answer"]} for p in load_prompts(cfg.data)])
    fn = resolve(g.rewards[0].name)

    def reward(prompts, completions, answer, **_):
        return [fn(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    reward.__name__ = g.rewards[0].name
    batch = g.prompts_per_step * r.n
    micro = min(cfg.train.micro_batch_size, batch)
    args = GRPOConfig(
        **trl_args(Path(cfg.run.output_dir) / "trl", cfg),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        num_generations=r.n,
        max_completion_length=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=max(r.top_k, 0),
        beta=g.kl_coef,
        num_iterations=g.num_iterations,
        epsilon=g.clip_low,
        epsilon_high=g.clip_high,
        loss_type="grpo",
        scale_rewards="group" if g.std_normalize else "none",
        shuffle_dataset=False,
        log_completions=False,
        mask_truncated_completions=False,
        generation_kwargs={"min_new_tokens": r.max_new_tokens, "suppress_tokens": [tok.pad_token_id]},
    )
    peft_cfg = None
    if cfg.method.name == "lora":  # the same adapters as ours: rank, alpha, every linear layer
        from peft import LoraConfig

        m = cfg.method
        peft_cfg = LoraConfig(
            r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = GRPOTrainer(
        model=build_model(cfg.model, master_dtype(cfg.model)),
        peft_config=peft_cfg,
        reward_funcs=[reward],
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[channel_callback(ch)],
    )
    split = {"time/rollout": 0.0, "time/reward": 0.0}

    def timed(key, inner):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                split[key] += time.perf_counter() - t

        return call

    trainer._generate = timed("time/rollout", trainer._generate)
    trainer._calculate_rewards = timed("time/reward", trainer._calculate_rewards)
    done = ch.done

    def done_with_split(**extra):
        done(**extra, **split)
        split.update({k: 0.0 for k in split})

    ch.done = done_with_split
    quiet(trainer).train()
    return {}


def grpo_cfg(
    work_dir: Path,
    w: dict[str, Any],
    steps: int,
    threads: int,
    model=None,
    extra=(),
    rollout: str = "hf",
    method: tuple[str, ...] = ("method=full",),
):
    model = model or [
        "model=tiny_llama",
        f"model.hidden_size={w['hidden']}",
        f"model.intermediate_size={w['intermediate']}",
        f"model.num_layers={w['layers']}",
        f"model.num_heads={w['heads']}",
        f"model.num_kv_heads={w['heads']}",
    ]
    return compose_cfg(
        [
            "stage=grpo",
            *method,
            "data=arithmetic",
            "logger=console",
            *model,
            f"data.num_samples={w['prompts'] * steps}",
            "data.shuffle=false",
            "cluster.num_workers=1",
            f"cluster.cpus_per_worker={threads}",
            f"rollout={rollout}",
            f"rollout.cpus_per_worker={threads}",
            f"stage.prompts_per_step={w['prompts']}",
            f"rollout.n={w['n']}",
            f"rollout.max_new_tokens={w['completion']}",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "stage.clip_high=0.2",
            "eval.samples=0",
            "stage.log_samples_every=0",
            "stage.kl_coef=0.0",
            f"train.micro_batch_size={w.get('micro', w['prompts'] * w['n'])}",
            f"train.max_steps={steps}",
            "train.scheduler=constant",
            "train.warmup_steps=0",
            "train.lr=1e-5",
            "checkpoint.every_steps=0",
            "checkpoint.save_final=false",
            "checkpoint.export_hf=false",
            f"run.output_dir={work_dir}",
            *extra,
        ]
    )


def run_grpo(cfg, w: dict[str, Any], warmup: int, repeats: int, threads: int, **kw) -> dict[str, dict[str, Any]]:
    res = interleave({"ours": (ours, {"cfg": cfg}), "trl": (trl, {"cfg": cfg})}, warmup, repeats, threads, **kw)
    out = {}
    for name, r in res.items():
        out[name] = result(r)
        out[name]["split_median_s"] = {
            k: median_extra(r["extras"], k) for k in _SPLIT if any(k in e for e in r["extras"])
        }
    out["ours"]["completion_len"] = median_extra(res["ours"]["extras"], "completion_len")
    return out


def grpo_iteration(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = (
        {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "prompts": 2, "n": 4, "completion": 4}
        if smoke
        else {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "prompts": 2, "n": 8, "completion": 32}
    )
    cfg = grpo_cfg(work_dir, w, warmup + repeats + 2, threads)
    out = run_grpo(cfg, w, warmup, repeats, threads)
    return {
        "title": "GRPO iteration (rollout + reward + update), tiny Llama",
        "unit": "s/iteration",
        "work": {
            **w,
            "samples_per_iteration": w["prompts"] * w["n"],
            "reward": cfg.stage.rewards[0].name,
            "dtype": "float32",
        },
        "contenders": out,
        "ratios": [time_ratio("ours/trl", out, "ours", "trl", 0.8)],
    }


# ------------------------------------------------- ours with `rollout=vllm` (standalone)
_TINY = {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "prompts": 2, "n": 8, "completion": 32}
_SMOLLM2 = {"prompts": 4, "n": 8, "completion": 32, "micro": 8}
_LORA = ("method=lora", "method.r=16", "method.alpha=32", "method.dropout=0.0")


def grpo_iteration_vllm(work_dir: Path, warmup: int, repeats: int, threads: int, model: str) -> dict[str, Any]:
    """Ours with `rollout=vllm` vs TRL `GRPOTrainer` (HF generate): the tiny Llama (full
    fine-tuning, as `grpo_iteration`), or SmolLM2-135M-Instruct with LoRA r=16 on every
    linear layer on both sides (ours syncs the merged weights into vLLM)."""
    if model == "smollm2":
        w, spec, method = _SMOLLM2, ["model=smollm2_135m"], _LORA
        title = "GRPO iteration, ours (rollout=vllm) vs TRL GRPOTrainer (HF generate), SmolLM2-135M LoRA r=16"
    else:
        w, spec, method = _TINY, None, ("method=full",)
        title = "GRPO iteration, ours (rollout=vllm) vs TRL GRPOTrainer (HF generate), tiny Llama"
    extra = ["rollout.cpu_kv_cache_gib=0.5"]
    cfg = grpo_cfg(work_dir, w, warmup + repeats + 2, threads, spec, extra, rollout="vllm", method=method)
    out = run_grpo(cfg, w, warmup, repeats, threads)
    return {
        "title": title,
        "unit": "s/iteration",
        "work": {
            **w,
            "samples_per_iteration": w["prompts"] * w["n"],
            "method": "lora r=16 alpha=32 all-linear" if model == "smollm2" else "full",
            "reward": cfg.stage.rewards[0].name,
            "dtype": "float32",
        },
        "contenders": out,
        "ratios": [time_ratio("ours(vllm)/trl", out, "ours", "trl", 0.6)],
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.grpo [--models smollm2 tiny] [--warmup 1] [--repeats 3]`: ours
    with `rollout=vllm` against TRL's GRPOTrainer, written to `results/grpo_vllm.{json,md,png}`."""
    import argparse

    ap = argparse.ArgumentParser(description="GRPO iteration: ours (rollout=vllm) vs TRL GRPOTrainer")
    ap.add_argument("--models", nargs="+", choices=("smollm2", "tiny"), default=["smollm2", "tiny"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per contender")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)

    from benchmarks.common import standalone_entry
    from benchmarks.harness import machine_info
    from benchmarks.report import write_results
    from benchmarks.run import _preload

    _preload()
    settings = {"warmup": args.warmup, "repeats": args.repeats, "threads": args.threads, "smoke": False}
    for model in args.models:
        entry = standalone_entry(
            "bench-grpo-vllm-",
            lambda work, model=model: grpo_iteration_vllm(work, args.warmup, args.repeats, args.threads, model),
        )
        name = f"grpo_iteration_vllm_{model}"
        write_results(args.out, "grpo_vllm", machine_info(), settings, {name: entry})
        c, r = entry["contenders"], entry["ratios"][0]
        print(
            f"{name}: ours {c['ours']['median_s']:.2f} s, trl {c['trl']['median_s']:.2f} s, "
            f"ratio {r['value']:.3f} (CPU time {r.get('cpu_value')}); ours split {c['ours']['split_median_s']}; "
            f"trl split {c['trl']['split_median_s']}"
        )
    return 0


if __name__ == "__main__":  # spawned helpers (the reward pool) re-import this module
    raise SystemExit(main())
