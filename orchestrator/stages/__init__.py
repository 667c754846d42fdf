"""Stages: the objective. Driver side, a stage turns data into per-rank micro-batches and
keeps the data position; worker side, its `loss` turns a micro-batch into a loss.
Registry: plain dict, greppable."""

from __future__ import annotations

from orchestrator.stages.grpo import GrpoStage
from orchestrator.stages.sft import SftStage

STAGES: dict[str, type] = {
    "sft": SftStage,
    "grpo": GrpoStage,
}
