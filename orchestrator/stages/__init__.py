"""Stages: the objective. Driver side, a stage turns data into per-rank micro-batches and
keeps the data position; worker side, its `loss` turns a micro-batch into a loss.
Registry: plain dict, greppable."""

from __future__ import annotations

from orchestrator.stages.cpt import CptStage
from orchestrator.stages.dpo import DpoStage
from orchestrator.stages.eval import EvalStage
from orchestrator.stages.grpo import GrpoStage
from orchestrator.stages.kto import KtoStage
from orchestrator.stages.ppo import PpoStage
from orchestrator.stages.rm import RmStage
from orchestrator.stages.sft import SftStage

STAGES: dict[str, type] = {
    "sft": SftStage,
    "cpt": CptStage,
    "grpo": GrpoStage,
    "dpo": DpoStage,
    "kto": KtoStage,
    "rm": RmStage,
    "ppo": PpoStage,
    "eval": EvalStage,
}
