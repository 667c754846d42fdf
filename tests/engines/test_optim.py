"""The LR schedules follow `transformers.get_scheduler` step for step (they are written as
LambdaLRs only to keep transformers.optimization out of worker start-up)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import get_scheduler

from orchestrator.engines.optim import build_scheduler


@pytest.mark.parametrize(
    "kind, hf_name", [("cosine", "cosine_with_min_lr"), ("linear", "linear"), ("constant", "constant_with_warmup")]
)
def test_schedules_match_transformers(kind, hf_name):
    t = SimpleNamespace(warmup_steps=7, scheduler=kind, min_lr_ratio=0.1)
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    ours = build_scheduler(ours_opt, t, total_steps=50)
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": 0.1}} if kind == "cosine" else {}
    hf = get_scheduler(hf_name, hf_opt, num_warmup_steps=7, num_training_steps=50, **extra)
    for _ in range(51):
        assert ours.get_last_lr()[0] == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-15)
        ours_opt.step(), hf_opt.step(), ours.step(), hf.step()
    # A resumed scheduler continues where it stopped.
    again = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4), t, total_steps=50)
    again.load_state_dict(ours.state_dict())
    assert again.get_last_lr() == ours.get_last_lr()


def test_unknown_schedule_is_named():
    t = SimpleNamespace(warmup_steps=0, scheduler="cosine_restarts", min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="cosine_restarts"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), t, 10)
