"""A toy stage and a toy method, written as a user would add them: no edit of the package.

* `ToySftStage` (stage=toy_sft): SFT with label smoothing, a new loss on the SFT data path.
* `Norms` (method=norms): trains only the normalisation weights.

tests/test_extending.py registers them (registry lines + schemas + config files) and runs
them end to end through the real entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from orchestrator.config.schema import MethodConfig, SftStageConfig
from orchestrator.data.chat import IGNORE
from orchestrator.methods.base import Method, Reference
from orchestrator.stages.sft import SftStage


@dataclass
class ToySftStageConfig(SftStageConfig):
    name: str = "toy_sft"
    smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""


class ToySftStage(SftStage):
    def step(self, roles, step: int):
        return super().step(roles, step)

    def next_step(self):
        per_rank, info = super().next_step()
        for mbs in per_rank:
            for mb in mbs:
                mb["smoothing"] = self.cfg.stage.smoothing
        return per_rank, info

    @staticmethod
    def loss(model: torch.nn.Module, mb: dict[str, torch.Tensor]):
        logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            mb["labels"][:, 1:].flatten(),
            ignore_index=IGNORE,
            reduction="sum",
            label_smoothing=mb["smoothing"],
        )
        return nll * (mb["world_size"] / mb["num_targets"]), {"nll_sum": nll.detach()}


@dataclass
class NormsMethodConfig(MethodConfig):
    name: str = "norms"


class Norms(Method):
    reference = Reference.FROZEN_COPY

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        return model

    def export(self, model, out_dir: Path, tokenizer, base_ref) -> dict[str, str]:
        model.save_pretrained(out_dir / "hf")
        tokenizer.save_pretrained(out_dir / "hf")
        return {"model": str(out_dir / "hf")}


STAGE_YAML = "defaults:\n  - /schema/stage@_here_: toy_sft\n  - _self_\n"
METHOD_YAML = "defaults:\n  - /schema/method@_here_: norms\n  - _self_\n"
