"""AdamW with decoupled weight decay (none on biases and norms) and an LR schedule.

Schedules come from `transformers.get_scheduler` (warmup, then cosine to
`min_lr_ratio * lr`, linear decay, or constant).
"""

from __future__ import annotations

import torch
from transformers import get_scheduler


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    # Fused AdamW (one kernel over all parameters) runs on CUDA and CPU, with DTensor (FSDP2)
    # parameters too; on the CPU benchmark it halves the optimizer's share of a step.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int):
    if t.scheduler == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=t.warmup_steps,
                             num_training_steps=total_steps,
                             scheduler_specific_kwargs={"min_lr_rate": t.min_lr_ratio})
    name = {"linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
