"""The Engine seam: one rank of a sharding backend (FSDP2, DeepSpeed ZeRO-3).

An engine is built inside a TrainWorker actor after torch.distributed is initialised,
from one role's spec (`orchestrator.roles.RoleSpec`): it never reads the run config.
Every public method is called on all ranks at once (most are collectives). Every backend
passes the shared conformance tests in tests/engines/.

`EngineBase` holds what every backend shares: the model build through the role's method,
the mixed-precision decision, the optimizer's parameter groups, the train step's
micro-batch loop and metric sums, token log-probs (policy or reference), the weights
that leave for inference (Hugging Face names) and the export. A backend keeps only what
differs: sharding (`_shard`), backward and the optimizer step, the full state dict, and
save / load.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

import torch

from orchestrator.engines.optim import _shape
from orchestrator.methods import get_method
from orchestrator.methods.base import unwrap
from orchestrator.models import auto_class
from orchestrator.models.kernels import apply_liger, compile_blocks
from orchestrator.models.logprobs import token_logprobs

# loss_fn(model, micro_batch) -> (loss to backward, {metric name: 0-d tensor or float summed over micro-batches})
LossFn = Callable[[torch.nn.Module, dict[str, Any]], Any]

MAX_SUFFIX = "_max"
"""A loss metric whose name ends so is reduced over micro-batches by max (values >= 0), not summed."""


def to_device(mb: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}


def compute_bf16(backend, device: torch.device) -> bool:
    """bf16 compute (fp32 master weights): `backend.mixed_precision` bf16, or auto on GPU."""
    return backend.mixed_precision == "bf16" or (backend.mixed_precision == "auto" and device.type == "cuda")


class EngineBase:
    param_counts: dict[str, int]
    """{"params_total": ..., "params_trainable": ...} of the unsharded model."""

    def __init__(self, spec, rank: int, world_size: int, device: torch.device, total_steps: int):
        self.spec, self.rank, self.world_size, self.device = spec, rank, world_size, device
        self.total_steps = total_steps
        self.compute_bf16 = compute_bf16(spec.backend, device)
        self.method = get_method(spec)
        self.optimizer = self.scheduler = None

    # --------------------------------------------------------------- backend hooks
    def _module(self) -> torch.nn.Module:
        """The module a training loss calls (with the backend's hooks on it)."""
        raise NotImplementedError

    def _inference_module(self) -> torch.nn.Module:
        """The module a no-grad forward calls: the method's model (peft wrapper included)."""
        return self._module()

    def _autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def _optimizer_step(self) -> tuple[torch.Tensor, bool]:
        """Clip, then update unless the global grad norm is non-finite: (norm, skipped)."""
        raise NotImplementedError

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded training-time state dict on CPU (collective; complete on rank 0)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def _after_build(self, model: torch.nn.Module) -> torch.nn.Module:
        """What every backend does to the method's model before sharding it: Liger kernels,
        activation checkpointing, then per-block compile (torchtitan's order: compile wraps
        the checkpointed block, sharding wraps the compiled one)."""
        if self.spec.kernels == "liger":
            apply_liger(model, self.device)
        if not self.spec.trainable:
            model.requires_grad_(False)
        self.hf_config = unwrap(model).config
        numels = [(_shape(p).numel(), p.requires_grad) for p in model.parameters()]
        self.param_counts = {
            "params_total": sum(n for n, _ in numels),
            "params_trainable": sum(n for n, g in numels if g),
        }
        if self.spec.trainable and self.spec.backend.activation_checkpointing:
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.spec.compile:
            compile_blocks(model)
        return model

    def _require_optimizer(self) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"role {self.spec.name!r} is frozen: it has no optimizer to step")

    def train_step(self, micro_batches: list[dict[str, Any]], loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward every micro-batch, clip, step (skipped on all ranks if the global
        grad norm is non-finite), schedule. Returns summed loss_fn metrics (the largest for keys
        ending in `MAX_SUFFIX`) plus grad_norm, lr, skipped (0/1) and local_finite (0/1, this
        rank's metrics were finite)."""
        self._require_optimizer()
        model = self._module()
        model.train()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for i, mb in enumerate(micro_batches):
            with self._autocast():
                loss, metrics = loss_fn(model, to_device(mb, self.device))
            self._backward(loss, last=i == len(micro_batches) - 1)
            for k, v in metrics.items():
                if k.endswith(MAX_SUFFIX):
                    sums[k] = torch.maximum(sums[k], torch.as_tensor(v, dtype=sums[k].dtype, device=self.device))
                else:
                    sums[k] = sums[k] + v
        lr = self.scheduler.get_last_lr()[0]
        norm, skipped = self._optimizer_step()
        # The schedule steps on every step, skipped or not, on every backend.
        self.scheduler.step()
        out = {k: float(v) for k, v in sums.items()}
        out.update(
            grad_norm=float(norm),
            lr=lr,
            skipped=float(skipped),
            local_finite=float(all(math.isfinite(v) for v in out.values())),
        )
        return out

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[dict[str, Any]], reference: bool = False) -> list[torch.Tensor]:
        """No-grad log-probs of `input_ids[:, 1:]` under this role's model, or (reference) under
        the reference its method keeps inside it (adapters off): one float32 CPU tensor
        [B, L-1] per micro-batch."""
        model = self._inference_module()
        model.eval()
        ctx = self.method.reference_context(model) if reference else contextlib.nullcontext()
        out = []
        with ctx, self._autocast():
            for mb in micro_batches:
                logp, _ = token_logprobs(model, to_device(mb, self.device), self.spec.logits_chunk_mb)
                out.append(logp.cpu())
        return out

    @torch.no_grad()
    def forward_eval(self, micro_batches: list[dict[str, Any]], fn: Callable[..., Any]) -> list[Any]:
        """No-grad `fn(model, micro_batch)` on every micro-batch (a stage's scoring, e.g. a
        reward model's sequence scores); tensors come back on CPU."""
        model = self._inference_module()
        model.eval()
        out = []
        with self._autocast():
            for mb in micro_batches:
                r = fn(model, to_device(mb, self.device))
                out.append(r.float().cpu() if torch.is_tensor(r) else r)
        return out

    def inference_state(self) -> dict[str, torch.Tensor]:
        """What weight sync sends to a rollout engine: the weights training changed, full
        (unsharded) CPU tensors under the base model's Hugging Face names (the method merges
        adapters or slices). Collective; rank 0 returns the dict, others {}."""
        state = self._full_state_dict()
        return self.method.hf_weights(state) if self.rank == 0 else {}

    def export_hf(self, out_dir: str, tokenizer) -> dict[str, str]:
        """Gather the full model on rank 0 and write it with the method's exporter
        (`transformers`/`peft`-loadable); returns {kind: path}."""
        sd = self._full_state_dict()
        if self.rank != 0:
            return {}
        sd = self.method.float_state(sd)
        if self.compute_bf16:
            sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
        auto, _ = auto_class(self.spec.head)
        with torch.device("meta"):
            skeleton = auto.from_config(self.hf_config)
        skeleton = self.method.apply(skeleton)
        skeleton.load_state_dict(sd, strict=False, assign=True)
        unwrap(skeleton).tie_weights()
        return self.method.export(skeleton, Path(out_dir), tokenizer, self.spec.model.pretrained)
