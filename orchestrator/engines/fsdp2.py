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
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List

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
from transformers import AutoModelForCausalLM

from orchestrator.engines.ckpt_io import ShardWriter, load_local_state, local_state
from orchestrator.engines.optim import build_optimizer, build_scheduler
from orchestrator.methods import get_method
from orchestrator.methods.base import count_parameters
from orchestrator.models import build_model, master_dtype, token_logprobs

log = logging.getLogger(__name__)


def _to(mb: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class FSDP2Engine:
    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, total_steps: int):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        on_gpu = device.type == "cuda"
        b = cfg.backend
        self.compute_bf16 = b.mixed_precision == "bf16" or (b.mixed_precision == "auto" and on_gpu)
        storage = master_dtype(cfg.model)

        self.method = get_method(cfg)
        model = build_model(cfg.model, storage)
        # New parameters (LoRA A) must start identical on every rank: each rank keeps only
        # its shard of its own copy, so differing inits would stitch together a mixed tensor.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model = self.method.apply(model)
        self.hf_config = _base(model).config
        self.param_counts = count_parameters(model)
        if b.activation_checkpointing:
            _base(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # One rank has nothing to shard: FSDP2 would still copy every parameter in and out of
        # its all-gather/reduce-scatter buffers and make each a DTensor, whose dispatch slows
        # the optimizer and clipping (benchmarks/README.md). The plain module computes the
        # same; bf16 compute then comes from autocast instead of the FSDP2 policy.
        self.sharded = world_size > 1 or b.shard_single_rank
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
            if self.compute_bf16 and not self.sharded else contextlib.nullcontext
        if self.sharded:
            mesh = init_device_mesh(device.type, (world_size,))
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.compute_bf16 else MixedPrecisionPolicy()
            blocks = set(getattr(_base(model), "_no_split_modules", None) or [])
            for module in model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=b.reshard_after_forward)
            fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=b.reshard_after_forward)
        else:
            model.to(device)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, total_steps)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.writer = ShardWriter()

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: List[Dict[str, Any]],
                   loss_fn: Callable[[torch.nn.Module, Dict[str, Any]], Any]) -> Dict[str, float]:
        self.model.train()
        sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for mb in micro_batches:
            with self._autocast():
                loss, metrics = loss_fn(self.model, _to(mb, self.device))
            loss.backward()
            for k, v in metrics.items():
                sums[k] = sums[k] + v
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        # The norm is reduced over all ranks, so a NaN/inf gradient anywhere makes every
        # rank skip the update together: no rank ever steps alone.
        finite = bool(torch.isfinite(norm))
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        out = {k: float(v) for k, v in sums.items()}
        out.update(grad_norm=float(norm), lr=lr, skipped=0.0 if finite else 1.0,
                   local_finite=float(all(math.isfinite(v) for v in out.values())))
        return out

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: List[Dict[str, Any]], reference: bool = False) -> List[torch.Tensor]:
        self.model.eval()
        if reference and not hasattr(self.model, "disable_adapter"):
            raise NotImplementedError("a frozen reference copy for method=full is not built yet")
        ctx = self.model.disable_adapter() if reference else contextlib.nullcontext()
        out = []
        with ctx, self._autocast():
            for mb in micro_batches:
                mb = _to(mb, self.device)
                logits = self.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                                    use_cache=False).logits
                out.append(token_logprobs(logits, mb["input_ids"]).cpu())
        return out

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        sd = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return sd if self.rank == 0 else {}

    # --------------------------------------------------------------- checkpoints
    _OPTS = StateDictOptions(ignore_frozen_params=True)

    def save(self, path: str, blocking: bool = True) -> None:
        msd, osd = get_state_dict(self.model, self.optimizer, options=self._OPTS)
        self.writer.save(path, self.rank, {"model": msd, "optim": osd}, local_state(self.scheduler, self.device),
                         blocking)

    def save_done(self, wait: bool = False) -> bool:
        return self.writer.done(wait)

    def load(self, path: str) -> None:
        self.writer.done(wait=True)
        msd, osd = get_state_dict(self.model, self.optimizer, options=self._OPTS)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        load_local_state(path, self.rank, self.scheduler, self.device)


    # -------------------------------------------------------------------- export
    def export_hf(self, out_dir: str, tokenizer) -> Dict[str, str]:
        """Gather the full model on rank 0 and write it with the method's exporter."""
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return {}
        if self.compute_bf16:
            sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        skeleton = self.method.apply(skeleton)
        skeleton.load_state_dict(sd, strict=False, assign=True)
        _base(skeleton).tie_weights()
        return self.method.export(skeleton, Path(out_dir), tokenizer, self.cfg.model.pretrained)

    def barrier(self) -> None:
        dist.barrier()
