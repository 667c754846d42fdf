"""SFT and LoRA step time: ours vs TRL `SFTTrainer` (+ PEFT) vs a plain PyTorch loop.

Identical work for every contender: the same locally built Llama (same config, same init
seed, fp32), the same rows tokenized once by our pipeline (every row cut to exactly
`seq` tokens, loss on completion tokens only), the same batches in the same order
(TRL's sampler is made sequential), one optimizer step per batch with no gradient
accumulation, AdamW with the same hyper-parameters, gradient clipping at 1.0, a
constant LR, no gradient checkpointing, no logging, saving or evaluation.

What each side does on top, as its users get it: ours builds micro-batches with
`SftStage.next_step` and runs `TrainWorker.train_step` (built from the stage's policy
role spec, with `SftStage.loss`) through the FSDP2 engine on a one-rank process group;
TRL runs `Trainer`'s loop (accelerate, callbacks, its fused
LM-head loss with entropy and token-accuracy metrics, fused AdamW); the plain loop is
forward, cross-entropy, backward, clip, step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    channel_callback,
    compose_cfg,
    local_worker,
    optimizer_state_bytes,
    policy_spec_of,
    quiet,
    sequential,
    sft_overrides,
    trl_args,
    write_long_rows,
)
from benchmarks.harness import interleave, ratio, result, time_ratio


def _rows(cfg):
    from orchestrator.models import build_tokenizer
    from orchestrator.stages.sft import SftStage

    tok = build_tokenizer(cfg.model)
    return SftStage(cfg, tok), tok


def ours(ch, cfg) -> dict[str, Any]:
    stage, _ = _rows(cfg)
    worker = local_worker(policy_spec_of(stage))
    while ch.next():
        per_rank, _ = stage.next_step()
        worker.train_step(per_rank[0])
        ch.done()
    return {
        "optimizer_state_bytes": optimizer_state_bytes(worker.engine.optimizer),
        "params": worker.engine.param_counts,
    }


def trl(ch, cfg, lora: bool, model_fn=None) -> dict[str, Any]:
    """`model_fn(cfg)`: the model TRL trains (default: the fp32 base, as ours builds it)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from orchestrator.models import build_model, master_dtype

    stage, tok = _rows(cfg)
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in stage.source.rows])
    peft_cfg = None
    if lora:
        m = cfg.method
        peft_cfg = LoraConfig(
            r=m.r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules="all-linear",
            bias=m.bias,
            task_type="CAUSAL_LM",
        )
    t = cfg.train
    args = SFTConfig(
        **trl_args(Path(cfg.run.output_dir) / "trl", cfg),
        max_length=cfg.data.max_seq_len,
        packing=False,
        padding_free=False,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size,
        dataset_num_proc=None,
    )
    trainer = sequential(SFTTrainer)(
        model=model_fn(cfg) if model_fn else build_model(cfg.model, master_dtype(cfg.model)),
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_cfg,
        callbacks=[channel_callback(ch)],
    )
    quiet(trainer).train()
    return {
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "optimizer": type(trainer.optimizer).__name__,
        "fused_adamw": bool(trainer.optimizer.defaults.get("fused")),
    }


def plain(ch, cfg) -> dict[str, Any]:
    from orchestrator.data.batching import collate
    from orchestrator.data.sft import IGNORE
    from orchestrator.models import build_model

    stage, tok = _rows(cfg)
    rows, b, t = stage.source.rows, cfg.train.micro_batch_size, cfg.train
    model = build_model(cfg.model, torch.float32).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    i = 0
    while ch.next():
        if (i + 1) * b > len(rows):
            i = 0
        batch = collate(rows[i * b : (i + 1) * b], tok.pad_token_id)
        i += 1
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ch.done()
    return {"optimizer_state_bytes": optimizer_state_bytes(opt)}


# ---------------------------------------------------------------- benchmarks
def _work(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "seq": 64, "batch": 2}
    return {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "seq": 256, "batch": 4}


def _model_overrides(w: dict[str, Any]):
    return [
        f"model.hidden_size={w['hidden']}",
        f"model.intermediate_size={w['intermediate']}",
        f"model.num_layers={w['layers']}",
        f"model.num_heads={w['heads']}",
        f"model.num_kv_heads={w['heads']}",
    ]


def _cfg(work_dir: Path, w: dict[str, Any], steps: int, threads: int, extra=()):
    data = write_long_rows(work_dir / "rows.jsonl", n=w["batch"] * (steps + 2), seq=w["seq"])
    return compose_cfg(sft_overrides(data, w["seq"], w["batch"], _model_overrides(w), work_dir, threads, extra))


def sft_step(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = _work(smoke)
    cfg = _cfg(work_dir, w, warmup + repeats, threads)
    res = interleave(
        {"ours": (ours, {"cfg": cfg}), "trl": (trl, {"cfg": cfg, "lora": False}), "torch": (plain, {"cfg": cfg})},
        warmup,
        repeats,
        threads,
    )
    out = {name: result(r) for name, r in res.items()}
    tokens = w["seq"] * w["batch"]
    for c in out.values():
        c["tokens_per_s"] = round(tokens / c["median_s"], 1)
    return {
        "title": "SFT step, tiny Llama",
        "unit": "s/step",
        "work": {
            **w,
            "params": out["ours"]["params"]["params_total"],
            "tokens_per_step": tokens,
            "dtype": "float32",
            "engine": "fsdp2 engine, 1 rank (unsharded module at world size 1)",
        },
        "contenders": out,
        "ratios": [
            time_ratio("ours/trl", out, "ours", "trl", 0.9),
            time_ratio("ours/torch", out, "ours", "torch", 1.05),
        ],
    }


def lora_step(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = _work(smoke)
    cfg = _cfg(
        work_dir,
        w,
        warmup + repeats,
        threads,
        ["method=lora", "method.r=8", "method.alpha=16", "method.target_modules=[all-linear]"],
    )
    res = interleave(
        {"ours": (ours, {"cfg": cfg}), "trl_peft": (trl, {"cfg": cfg, "lora": True})}, warmup, repeats, threads
    )
    out = {name: result(r) for name, r in res.items()}
    return {
        "title": "LoRA step (r=8, all-linear), tiny Llama",
        "unit": "s/step",
        "work": {
            **w,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": cfg.method.dropout,
            "params_trainable": out["ours"]["params"]["params_trainable"],
        },
        "contenders": out,
        "ratios": [
            time_ratio("ours/trl_peft", out, "ours", "trl_peft", 0.9),
            ratio(
                "peak RSS ours/trl_peft", out["ours"]["rss_peak_delta_mb"], out["trl_peft"]["rss_peak_delta_mb"], None
            ),
        ],
    }
