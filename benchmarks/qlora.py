"""QLoRA: LoRA on a 4-bit NF4 base (`method=qlora`) vs LoRA on the fp32 base (`method=lora`),
both ours, and vs TRL + PEFT on the same 4-bit base.

The same locally built Llama as `lora_step` (same init seed), the same batches and the same
step; adapters r=8 on every linear layer, no dropout. Ours is the FSDP2 engine on one rank
(the unsharded module); the 4-bit base is what `Qlora.load_base` builds (bitsandbytes NF4,
double quantization, fp32 compute and storage on CPU), and TRL gets that same quantized
model (its `SFTTrainer` prepares it for k-bit training itself) with the same LoRA config.
Reported: step time, peak RSS growth, and the bytes of the frozen base weights (4-bit codes
and constants vs the same weights in fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import compose_cfg, sft_overrides, write_long_rows
from benchmarks.harness import interleave, ratio, result, time_ratio
from benchmarks.sft import _model_overrides, _work, ours, trl

LORA = ["method.r=8", "method.alpha=16", "method.dropout=0.0", "method.target_modules=[all-linear]"]


def quantized_base(cfg):
    """The 4-bit base as `method=qlora` loads it (for the TRL contender)."""
    from orchestrator.methods.qlora import Qlora
    from orchestrator.models import master_dtype

    return Qlora(cfg.method).load_base(cfg.model, master_dtype(cfg.model))


def qlora_step(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = _work(smoke)
    data = write_long_rows(work_dir / "rows.jsonl", n=w["batch"] * (warmup + repeats + 2), seq=w["seq"])
    cfgs = {
        m: compose_cfg(
            sft_overrides(
                data, w["seq"], w["batch"], _model_overrides(w), work_dir / m, threads, [f"method={m}", *LORA]
            )
        )
        for m in ("lora", "qlora")
    }
    res = interleave(
        {
            "ours_qlora": (ours, {"cfg": cfgs["qlora"]}),
            "ours_lora": (ours, {"cfg": cfgs["lora"]}),
            "trl_peft_qlora": (trl, {"cfg": cfgs["qlora"], "lora": True, "model_fn": quantized_base}),
        },
        warmup,
        repeats,
        threads,
    )
    out = {name: result(r) for name, r in res.items()}
    params = out["ours_qlora"]["params"]
    base = {k: params[k] for k in ("base_4bit_bytes", "base_fp32_bytes", "base_bf16_bytes")}
    return {
        "title": "QLoRA step (NF4 base, r=8, all-linear) vs LoRA, tiny Llama",
        "unit": "s/step",
        "work": {**w, "lora_r": 8, "params_trainable": params["params_trainable"], **base},
        "contenders": out,
        "ratios": [
            time_ratio("step time ours qlora/lora", out, "ours_qlora", "ours_lora", None),
            time_ratio("step time ours qlora/trl_peft_qlora", out, "ours_qlora", "trl_peft_qlora", None),
            ratio("base weight bytes 4-bit/fp32", base["base_4bit_bytes"], base["base_fp32_bytes"], None),
            ratio("base weight bytes 4-bit/bf16", base["base_4bit_bytes"], base["base_bf16_bytes"], None),
            ratio(
                "peak RSS ours qlora/lora",
                out["ours_qlora"]["rss_peak_delta_mb"],
                out["ours_lora"]["rss_peak_delta_mb"],
                None,
            ),
        ],
    }
