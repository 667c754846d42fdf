"""FSDP2 engine: `fully_shard` on every transformer block, then on the root.

One instance per rank, inside a Ray worker actor, after torch.distributed is up
(NCCL on GPU, gloo on CPU). Parameters are stored in fp32 and, on GPU, computed in bf16
with fp32 gradient reduction (`MixedPrecisionPolicy`), as torchtitan does. Checkpoints
are `torch.distributed.checkpoint` (DCP) sharded state, so they reload on a different
number of ranks; frozen parameters (a LoRA base) are not written, since they are
rebuilt from the model source.

Every rank builds the full model on CPU before sharding. That keeps the code simple and
is fine up to ~8B on typical nodes; beyond that, build on the meta device and broadcast
from rank 0 (see `set_model_state_dict(broadcast_from_rank0=True)`).

One rank has nothing to shard: FSDP2 would still copy every parameter in and out of its
all-gather/reduce-scatter buffers and make each a DTensor, whose dispatch slows the
optimizer and clipping (benchmarks/README.md). So at world size 1 the plain module trains
(`backend.shard_single_rank` forces FSDP2); it computes the same, with bf16 compute from
autocast instead of the FSDP2 policy.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from orchestrator.engines.base import EngineBase
from orchestrator.engines.ckpt_io import ShardWriter, load_local_state, local_state
from orchestrator.engines.optim import build_optimizer, build_scheduler
from orchestrator.models import master_dtype
from orchestrator.models.kernels import decoder_blocks

_OPTS = StateDictOptions(ignore_frozen_params=True)


class FSDP2Engine(EngineBase):
    def __init__(self, spec, rank: int, world_size: int, device: torch.device, total_steps: int):
        super().__init__(spec, rank, world_size, device, total_steps)
        b = spec.backend
        model = self._after_build(self.method.build(spec.model, master_dtype(spec.model), spec.seed, spec.head))
        self.sharded = world_size > 1 or b.shard_single_rank
        if self.sharded:
            self._shard(model, b)
        else:
            model.to(device)
        self.param_counts.update(self.method.memory_stats(model))  # as this rank holds it, sharded
        self.model = model
        if spec.trainable:
            self.optimizer = build_optimizer(model, spec.train)
            self.scheduler = build_scheduler(self.optimizer, spec.train, total_steps)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.writer = ShardWriter()

    def _shard(self, model: torch.nn.Module, b) -> None:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.compute_bf16
            else MixedPrecisionPolicy()
        )
        # Packed 4-bit codes stored as floats must not be cast to bf16: under bf16 compute each
        # quantized module is its own unit without casting (in fp32 its block gathers it as is).
        uncast = MixedPrecisionPolicy()
        for module in self.method.quantized_modules(model) if self.compute_bf16 else []:
            fully_shard(module, mesh=mesh, mp_policy=uncast, reshard_after_forward=b.reshard_after_forward)
        for module in decoder_blocks(model):
            fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=b.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=b.reshard_after_forward)

    # ------------------------------------------------------------------ training
    def _module(self) -> torch.nn.Module:
        return self.model

    def _autocast(self) -> ContextManager:
        if self.compute_bf16 and not self.sharded:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _optimizer_step(self) -> tuple[torch.Tensor, bool]:
        max_norm = self.spec.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        # The norm is reduced over all ranks, so a NaN/inf gradient anywhere makes every
        # rank skip the update together: no rank ever steps alone.
        finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, not finite

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # --------------------------------------------------------------- checkpoints
    def save(self, path: str, blocking: bool = True) -> None:
        self._require_optimizer()
        msd, osd = get_state_dict(self.model, self.optimizer, options=_OPTS)
        self.writer.save(
            path, self.rank, {"model": msd, "optim": osd}, local_state(self.scheduler, self.device), blocking
        )

    def save_done(self, wait: bool = False) -> bool:
        return self.writer.done(wait)

    def load(self, path: str) -> None:
        self._require_optimizer()
        self.writer.done(wait=True)
        msd, osd = get_state_dict(self.model, self.optimizer, options=_OPTS)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        load_local_state(path, self.rank, self.scheduler, self.device)

    def barrier(self) -> None:
        dist.barrier()
