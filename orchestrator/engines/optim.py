"""AdamW with decoupled weight decay (none on biases and norms) and an LR schedule.

Schedules: linear warmup, then cosine to `min_lr_ratio * lr`, linear decay to 0, or
constant; the same formulas as `transformers.get_scheduler`'s `cosine_with_min_lr`,
`linear` and `constant_with_warmup`. They are written here as `LambdaLR`s because importing
`transformers.optimization` pulls in `transformers.trainer_utils` and peft (about 1.4 s per
worker process, a tenth of the time to the first step on a laptop).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def _shape(p: torch.nn.Parameter) -> torch.Size:
    # After DeepSpeed's zero.Init a parameter is an empty placeholder; `ds_shape` is its real shape.
    # A bitsandbytes 4-bit weight holds packed codes; its quant_state has the real shape.
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape if quant_state is not None else getattr(p, "ds_shape", p.shape)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Decay on matrices, none on biases and norms (by the parameter's real shape)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, t, fused: bool = True, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. Fused AdamW (one kernel over all parameters) runs on CUDA and
    CPU, with DTensor (FSDP2) parameters too; on the CPU benchmark it halves the optimizer's
    share of a step. `cpu_adam`: DeepSpeedCPUAdam, the same update for ZeRO-Offload."""
    groups = param_groups(model, t.weight_decay)
    kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw, **({"fused": True} if fused else {}))


def build_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int) -> LambdaLR:
    warmup, kind, floor = t.warmup_steps, t.scheduler, t.min_lr_ratio
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown train.scheduler {kind!r}: use cosine, linear or constant")

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)
