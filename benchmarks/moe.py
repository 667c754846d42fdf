"""MoE: training 2 of 8 experts (`method=experts`) vs the whole model (`method=full`).

Both are ours, on the same tiny Qwen3-MoE (same init, fp32), the same batches and the
same step (FSDP2 engine, one rank). Reported: step time and the bytes of AdamW state
after a step, which exist only for trainable parameters (for `experts`: the selected
expert slices of every MoE layer; router, attention and embeddings stay frozen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import compose_cfg, sft_overrides, write_long_rows
from benchmarks.harness import interleave, ratio, result, time_ratio
from benchmarks.sft import ours


def moe_experts(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = (
        {"hidden": 32, "moe_intermediate": 32, "layers": 2, "experts": 8, "seq": 64, "batch": 2}
        if smoke
        else {"hidden": 128, "moe_intermediate": 128, "layers": 4, "experts": 8, "seq": 256, "batch": 4}
    )
    data = write_long_rows(work_dir / "rows.jsonl", n=w["batch"] * (warmup + repeats + 2), seq=w["seq"])
    model = [
        "model=tiny_moe",
        f"model.hidden_size={w['hidden']}",
        f"model.intermediate_size={2 * w['hidden']}",
        f"model.moe_intermediate_size={w['moe_intermediate']}",
        f"model.num_layers={w['layers']}",
        f"model.num_experts={w['experts']}",
        "model.num_experts_per_tok=2",
    ]
    cfgs = {}
    for method in ("full", "experts"):
        extra = ["method=experts", "method.experts=[0,1]"] if method == "experts" else ["method=full"]
        run = work_dir / method
        cfgs[method] = compose_cfg(sft_overrides(data, w["seq"], w["batch"], model, run, threads, extra))
    res = interleave({m: (ours, {"cfg": c}) for m, c in cfgs.items()}, warmup, repeats, threads)
    out = {name: result(r) for name, r in res.items()}
    for c in out.values():
        c["optimizer_state_mib"] = round(c["optimizer_state_bytes"] / 2**20, 3)
    return {
        "title": "MoE: 2 of 8 experts trained vs full",
        "unit": "s/step",
        "work": {
            **w,
            "experts_trained": [0, 1],
            "params_total": out["full"]["params"]["params_total"],
            "params_trainable_experts": out["experts"]["params"]["params_trainable"],
        },
        "contenders": out,
        "ratios": [
            time_ratio("step time experts/full", out, "experts", "full", None),
            ratio(
                "optimizer state experts/full",
                out["experts"]["optimizer_state_bytes"],
                out["full"]["optimizer_state_bytes"],
                None,
            ),
        ],
    }
