"""DPO step: ours vs TRL `DPOTrainer` (+ PEFT), with the reference recomputed every step and
with reference log-probs precomputed once.

Identical work for every contender: the same locally built Llama (same config, same init
seed, fp32), LoRA r=8 on every linear layer (no dropout), so that the reference policy is
the base with the adapters off on both sides (no second model); the same pairs in the same
order, each a prompt and two completions cut to the same lengths, tokenized once by our
pipeline and given to TRL as token ids; the sigmoid loss with beta 0.1; one optimizer step
per batch, no gradient accumulation, AdamW with the same hyper-parameters, clipping at
1.0, a constant LR; no logging, saving or evaluation.

Ours runs the real `DpoStage.step` on its TrainWorker (built from the stage's policy role
spec, in-process, one rank): the reference forward, then the train step, each chosen and
rejected pair in one concatenated forward. With `stage.precompute_ref=true` it computes the
reference sums of every pair before the first step (`DpoStage.setup`), as TRL's
`precompute_ref_log_probs=True` does in its first `get_train_dataloader`; that pass is
setup on both sides, not timed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from benchmarks.common import (
    channel_callback,
    compose_cfg,
    local_roles,
    local_worker,
    policy_spec_of,
    quiet,
    sequential,
    sft_overrides,
    trl_args,
)
from benchmarks.harness import interleave, ratio, result, time_ratio
from benchmarks.sft import _model_overrides, _work

LORA = ["method=lora", "method.r=8", "method.alpha=16", "method.dropout=0.0", "method.target_modules=[all-linear]"]
BETA = 0.1


def write_pairs(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    """`n` preference rows whose prompt and completions together exceed `seq` tokens, so
    that every pair is cut to the same lengths (prompt about seq/2, completions the rest)."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]

    def text(chars: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, chars // 6)))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(seq), "chosen": text(seq), "rejected": text(seq)}) + "\n")
    return path


def _stage(cfg):
    from orchestrator.models import build_tokenizer
    from orchestrator.stages.dpo import DpoStage

    tok = build_tokenizer(cfg.model)
    return DpoStage(cfg, tok), tok


def ours(ch, cfg) -> dict[str, Any]:
    stage, _ = _stage(cfg)
    spec = policy_spec_of(stage)
    roles = local_roles(spec, local_worker(spec, stage.total_steps))
    if stage.precompute:  # DpoStage.setup's reference pass, minus the held-out evaluation
        Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)  # the driver makes the run dir
        stage.precompute_reference(roles, 0, stage.pairs)
    step = 0
    while ch.next():
        step += 1
        m = stage.step(roles, step)
        ch.done(**{k: m[k] for k in ("time/reference", "time/train") if k in m})
    return {}


def trl(ch, cfg, precompute: bool) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from orchestrator.models import build_model, master_dtype

    stage, tok = _stage(cfg)
    # TRL gets our token ids (the columns its own tokenization writes), so that both sides
    # train on the same tokens; its `_prepare_dataset` (tokenization) is skipped for that.
    pairs = stage.pairs.gather(range(len(stage.pairs)))
    rows = [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    m, t = cfg.method, cfg.train
    args = DPOConfig(
        **trl_args(Path(cfg.run.output_dir) / ("trl_pre" if precompute else "trl"), cfg),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=t.micro_batch_size,
        dataset_num_proc=None,
    )
    trainer = sequential(Pretokenized)(
        model=build_model(cfg.model, master_dtype(cfg.model)),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(
            r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[channel_callback(ch)],
    )
    quiet(trainer).train()
    return {}


def dpo_step(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = _work(smoke)
    steps = warmup + repeats + 2
    data = write_pairs(work_dir / "pairs.jsonl", n=w["batch"] * steps, seq=w["seq"])
    base = sft_overrides(data, w["seq"], w["batch"], _model_overrides(w), work_dir, threads, LORA)
    base = [o for o in base if not o.startswith("+experiment=")]
    common = [
        "+experiment=dpo_ultrafeedback",
        "model=tiny_llama",
        "cluster.gpus_per_worker=0",
        "stage.loss=sigmoid",
        f"stage.beta={BETA}",
        "eval.samples=0",
        *base,
    ]
    cfgs = {
        "default": compose_cfg([*common, f"run.output_dir={work_dir / 'ours'}"]),
        "precompute": compose_cfg([*common, "stage.precompute_ref=true", f"run.output_dir={work_dir / 'ours_pre'}"]),
    }
    res = interleave(
        {
            "ours": (ours, {"cfg": cfgs["default"]}),
            "trl": (trl, {"cfg": cfgs["default"], "precompute": False}),
            "ours_precomputed_ref": (ours, {"cfg": cfgs["precompute"]}),
            "trl_precomputed_ref": (trl, {"cfg": cfgs["precompute"], "precompute": True}),
        },
        warmup,
        repeats,
        threads,
    )
    out = {name: result(r) for name, r in res.items()}
    return {
        "title": "DPO step (sigmoid, LoRA r=8 all-linear, reference = adapters off), tiny Llama",
        "unit": "s/step",
        "work": {**w, "pairs_per_step": w["batch"], "beta": BETA, "lora_r": 8, "dtype": "float32"},
        "contenders": out,
        "ratios": [
            time_ratio("ours/trl (reference every step)", out, "ours", "trl", 0.75),
            time_ratio("ours/trl (reference precomputed)", out, "ours_precomputed_ref", "trl_precomputed_ref", 0.9),
            ratio(
                "peak RSS ours/trl",
                out["ours"]["rss_peak_delta_mb"],
                out["trl"]["rss_peak_delta_mb"],
                None,
            ),
        ],
    }
