"""Model roles: what one worker group holds, and the groups a stage runs with.

A stage declares its roles (`Stage.roles`): `policy` (trained, always), and optionally
`reference` (frozen), `critic` (trained, value head), `reward_model` (frozen, scalar
head). Each role is a `RoleSpec`: its own model spec, method, optimizer settings (None:
frozen), backend, placement and loss. The driver builds one worker group per role from
it; an engine reads its role spec and nothing else of the run config. The rollout engine
is not a role here: it is built from the top-level `rollout` config by the stage that
generates (`orchestrator.rollout`).

The reference policy comes from the policy's method (`Method.reference`): methods whose
base stays intact under the trained weights (LoRA adapters, expert slices) compute it on
the policy's own workers with those weights switched off; `full` gets a frozen copy of the
starting weights as a `reference` role, colocated on the policy's bundles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from orchestrator.config.schema import (
    BackendConfig,
    ClusterConfig,
    DataConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)

POLICY, REFERENCE, CRITIC, REWARD_MODEL = "policy", "reference", "critic", "reward_model"


@dataclass
class RoleSpec:
    """Everything a worker group of one role needs to build and run its engine."""

    name: str
    """policy | reference | critic | reward_model (or a stage's own role name)."""
    model: ModelConfig
    method: MethodConfig
    backend: BackendConfig
    cluster: ClusterConfig
    """Workers and resources of the group (`num_workers`, `cpus_per_worker`, ...)."""
    train: Optional[TrainConfig] = None
    """Optimizer, schedule and clipping; None: a frozen role (no optimizer, no checkpoint)."""
    loss: Optional[Callable[..., Any]] = None
    """Worker-side loss `loss(model, micro_batch) -> (loss, metrics)` of a trained role."""
    method_cls: Optional[type] = None
    """The method's class, resolved from the registry on the driver (so a method registered
    at run time reaches the workers); None: `METHODS[method.name]` where it is built."""
    head: str = "lm"
    """lm (causal LM) | value | score (a scalar head, for critics and reward models)."""
    colocate_with: Optional[str] = None
    """Share the bundles of this role's group (time-shared CPU, a slice of the GPU)."""
    gpu_share: float = 1.0
    """Fraction of a bundle's GPU this role's actors take."""
    seed: int = 0
    """Seed of new parameters (LoRA A): identical on every rank."""
    data: Optional[DataConfig] = None
    """The run's data, for methods that measure it (experts' router statistics)."""
    run_dir: Optional[str] = None
    """The run directory, for methods that keep files there (experts' selection)."""
    logits_chunk_mb: int = 256
    """Token log-probs are computed over chunks of tokens whose fp32 logits stay below this."""
    kernels: str = "none"
    """none | liger: Liger's kernels on the model and its fused linear CE for log-probs (`train.kernels`)."""
    compile: bool = False
    """torch.compile each decoder block (`train.compile`)."""

    @property
    def trainable(self) -> bool:
        return self.train is not None

    def frozen_copy(self, name: str, gpu_share: float = 0.0) -> RoleSpec:
        """This role's model at its starting weights, frozen, on the same bundles."""
        from orchestrator.config.schema import FullMethodConfig
        from orchestrator.methods.full import Full

        return replace(
            self,
            name=name,
            method=FullMethodConfig(),
            method_cls=Full,
            train=None,
            loss=None,
            colocate_with=self.name,
            gpu_share=gpu_share,
        )


def policy_spec(cfg, loss: Optional[Callable[..., Any]] = None, gpu_share: float = 1.0) -> RoleSpec:
    """The policy role of a run config: the run's model, method, backend and optimizer."""
    from orchestrator.methods import METHODS

    return RoleSpec(
        name=POLICY,
        model=cfg.model,
        method=cfg.method,
        method_cls=METHODS[cfg.method.name],
        backend=cfg.backend,
        cluster=cfg.cluster,
        train=cfg.train,
        loss=loss,
        gpu_share=gpu_share,
        seed=cfg.train.seed,
        data=cfg.data,
        run_dir=str(cfg.run.output_dir),
        logits_chunk_mb=cfg.train.logits_chunk_mb,
        kernels=str(cfg.train.kernels),
        compile=cfg.train.compile,
    )


@dataclass
class Roles:
    """The live worker groups of a run, by role name (the driver replaces them on recovery)."""

    groups: dict[str, Any] = field(default_factory=dict)
    specs: dict[str, RoleSpec] = field(default_factory=dict)

    @property
    def policy(self) -> Any:
        return self.groups[POLICY]

    def __getitem__(self, name: str) -> Any:
        return self.groups[name]

    def __contains__(self, name: str) -> bool:
        return name in self.groups

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def trained(self) -> list[str]:
        return [n for n, s in self.specs.items() if s.trainable]

    def reference_logprobs(self, per_rank: list[list[dict[str, Any]]]) -> list[list[Any]]:
        """Log-probs under the reference policy: its own group when the stage declared one
        (a frozen copy), else the policy's workers with the trained weights switched off."""
        if REFERENCE in self.groups:
            return self.groups[REFERENCE].call_per_rank("forward_logprobs", per_rank)
        return self.policy.call_per_rank("forward_logprobs", per_rank, reference=True)

    def shutdown(self) -> None:
        for group in reversed(list(self.groups.values())):
            group.shutdown()
        self.groups.clear()
