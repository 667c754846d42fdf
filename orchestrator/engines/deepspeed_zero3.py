"""DeepSpeed ZeRO-3 engine: parameters, gradients and optimizer state partitioned over ranks.

One instance per rank, inside a Ray worker actor, on the process group TrainWorker set up
(gloo on CPU with `DS_ACCELERATOR=cpu`, NCCL on GPU). A drop-in for FSDP2: the same
Engine protocol, the same update rule, the same loss scale, resumable and reshardable
checkpoints; tests/engines/ runs the same conformance scenarios on both.

* Construction runs under `zero.Init` through transformers' ZeRO-3 integration
  (`HfDeepSpeedConfig`, alive only while the model is built): each parameter is partitioned
  as soon as its module exists and weights are loaded or initialised one module at a time,
  so a large model never materialises whole on one rank. A locally built model is
  initialised by rank 0 module by module: seeded and the same for any number of ranks,
  but in another RNG order than FSDP2's build, so compare the two backends from the same
  weights (`model.pretrained`), as tests/engines/test_cross_backend.py does.
* The DeepSpeed config is generated from the typed config (`ds_config`); `backend.extra` is
  deep-merged over it for expert keys. Keys that the typed config owns are rejected there
  by validation, so there is one source for each setting.
* Optimizer and schedule are FSDP2's: AdamW with decay / no-decay groups and the
  transformers schedule, given to DeepSpeed as a client optimizer (DeepSpeed's `optimizer`
  / `scheduler` sections differ: fused kernels, no decay groups, other warmup shapes).
  With optimizer offload, DeepSpeedCPUAdam runs the same AdamW update on the CPU.
  The schedule steps here on every step, skipped or not, as in FSDP2 (DeepSpeed does not
  step a scheduler on an overflowed step).
* One `train_step` is one optimizer step over every micro-batch it is given: the
  accumulation boundary is set explicitly on the last one and DeepSpeed does not divide
  the loss by its accumulation steps (`scale_wrt_gas=False`); the stage loss is already
  normalised over the global batch and DeepSpeed averages gradients over ranks, as FSDP2
  does. The global grad norm is all-reduced, so a non-finite one makes every rank skip the
  update (DeepSpeed's overflow path); we report skipped=1.
* Checkpoints: DeepSpeed's own ZeRO-3 checkpoints reload only on the same number of ranks
  (another number needs an offline universal-checkpoint conversion). So each rank writes
  its partition of the fp32 master weights and Adam moments, read and written through
  DeepSpeed's `safe_{get,set}_local_*` API, into a `torch.distributed.checkpoint`, as FSDP2
  does. A ZeRO-3 partition is a contiguous ceil(numel / ranks) chunk of the flattened
  parameter, which is exactly DTensor's `Shard(0)` layout of that flat tensor, so DCP
  reshards on load. Frozen parameters (a LoRA base) are rebuilt from the model source.
* Export gathers one module at a time on rank 0 (DeepSpeed's consolidated state dict, as
  accelerate uses it) and writes through the method's exporter, as FSDP2 does.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from orchestrator.engines.base import EngineBase
from orchestrator.engines.ckpt_io import ShardWriter, load_local_state, local_state
from orchestrator.engines.optim import build_optimizer, build_scheduler
from orchestrator.errors import ConfigError
from orchestrator.models import master_dtype

if not torch.cuda.is_available():
    # DeepSpeed fixes its accelerator at first use; a CPU worker must say so before that.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

INSTALL_HINT = 'pip install -e ".[deepspeed]"'
_MOMENTS = ("exp_avg", "exp_avg_sq")
# Batch bookkeeping of a frozen role (DeepSpeed requires the keys; nothing steps).
_FROZEN = SimpleNamespace(global_batch_size=1, micro_batch_size=1, max_grad_norm=0.0)


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            f"backend=deepspeed_zero3 needs DeepSpeed, which is not installed here "
            f"({exc}). Install the extra: {INSTALL_HINT}, or use backend=fsdp2."
        ) from exc
    return deepspeed


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        both_dicts = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both_dicts else copy.deepcopy(v)
    return out


def ds_config(spec, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a role (`RoleSpec`, or anything with `backend` and `train`),
    with `backend.extra` merged over it. A frozen role gets no optimizer settings."""
    b = spec.backend
    t = spec.train if spec.train is not None else _FROZEN
    # Bookkeeping only (DeepSpeed's sample counters): the step boundary is set explicitly.
    gas = max(1, t.global_batch_size // world_size // t.micro_batch_size)
    bf16 = b.mixed_precision == "bf16" or (b.mixed_precision == "auto" and on_gpu)
    zero: dict[str, Any] = {"stage": 3}
    for what in ("optimizer", "param"):
        device = getattr(b, f"offload_{what}")
        if device != "none":
            zero[f"offload_{what}"] = {"device": device, "pin_memory": on_gpu}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # torch AdamW as the client optimizer; DeepSpeed only vouches for its own by default.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # progress is logged by the driver
        "wall_clock_breakdown": False,
    }
    if bf16:
        conf["communication_data_type"] = "fp32"  # reduce gradients in fp32, as FSDP2 does
    return deep_merge(conf, dict(b.extra))


class DeepSpeedZero3Engine(EngineBase):
    def __init__(self, spec, rank: int, world_size: int, device: torch.device, total_steps: int):
        super().__init__(spec, rank, world_size, device, total_steps)
        self.writer = ShardWriter()
        ds = import_deepspeed()
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        on_gpu = device.type == "cuda"
        self.ds_config = ds_config(spec, world_size, on_gpu)
        # Ray gives each actor its own device(s), and TrainWorker uses the first.
        os.environ.setdefault("LOCAL_RANK", "0")
        if not on_gpu:
            # The CPU accelerator's shared-memory all-reduce serves DeepSpeed inference only,
            # yet creating the comm backend JIT-compiles it (about a minute, per machine).
            ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group

        hf_ds = HfDeepSpeedConfig(self.ds_config)  # transformers builds under zero.Init while it lives
        try:
            model = self.method.load_base(spec.model, master_dtype(spec.model), spec.head)
        finally:
            unset_hf_deepspeed_config()
            del hf_ds
        # New parameters (LoRA A) must start identical on every rank: each rank keeps only its
        # partition of its own copy when DeepSpeed converts them.
        model = self._after_build(self.method.apply_seeded(model, spec.seed))

        if spec.trainable:
            self.optimizer = build_optimizer(
                model, spec.train, fused=False, cpu_adam=spec.backend.offload_optimizer != "none"
            )
        self.engine, _, _, _ = ds.initialize(
            model=model, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False
        )
        if spec.trainable:
            self.zero = self.engine.optimizer  # DeepSpeedZeroOptimizer_Stage3 around self.optimizer
            self.scheduler = build_scheduler(self.optimizer, spec.train, total_steps)
            self._init_adam_state()
        self.mesh = init_device_mesh(device.type, (world_size,))
        self._trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ training
    def _module(self) -> torch.nn.Module:
        return self.engine

    def _inference_module(self) -> torch.nn.Module:
        return self.engine.module  # ZeRO-3 gathers parameters through hooks on the module itself

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # One train_step is one optimizer step: the accumulation boundary is the last
        # micro-batch, and the loss is already normalised over the global batch.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def _optimizer_step(self) -> tuple[torch.Tensor, bool]:
        skipped_before = self.engine.skipped_steps
        self.engine.step()  # clips, then updates unless the all-reduced grad norm is non-finite
        return torch.tensor(float(self.engine.get_global_grad_norm())), self.engine.skipped_steps > skipped_before

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        # DeepSpeed's consolidated state dict (as accelerate uses it): one module gathered at
        # a time; a collective, None off rank 0.
        return self.engine._zero3_consolidated_16bit_state_dict() or {}

    # --------------------------------------------------------------- checkpoints
    def _init_adam_state(self) -> None:
        """Adam creates its state at the first step; create it now (the same zeros) so that a
        checkpoint can be loaded into, or saved from, an engine that has not stepped yet."""
        for flat in self.zero.fp32_partitioned_groups_flat:
            state = self.optimizer.state[flat]
            if not state:
                state.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
                self._set_adam_step(state, 0)

    def _set_adam_step(self, state: dict[str, Any], step: int) -> None:
        # torch AdamW counts in a float32 tensor, DeepSpeedCPUAdam in an int.
        state["step"] = torch.tensor(float(step)) if isinstance(self.optimizer, torch.optim.AdamW) else step

    def _adam_step(self) -> int:
        return max(int(self.optimizer.state[f]["step"]) for f in self.zero.fp32_partitioned_groups_flat)

    def _shard(self, p: torch.nn.Parameter, local: torch.Tensor) -> DTensor:
        """This rank's partition of flattened `p` as a DTensor shard (DeepSpeed pads the tail)."""
        n, part = p.ds_numel, local.numel()
        assert part == -(-n // self.world_size), "unexpected ZeRO-3 partition layout"
        valid = max(0, min(part, n - self.rank * part))
        return DTensor.from_local(
            local[:valid], self.mesh, [Shard(0)], run_check=False, shape=torch.Size([n]), stride=(1,)
        )

    def save(self, path: str, blocking: bool = True) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        # DeepSpeed hands out views into its flat partition buffers, which DCP's background
        # stager cannot copy: a background save takes its own copy here instead.
        own = (lambda t: t) if blocking else (lambda t: t.detach().clone())
        state: dict[str, Any] = {"adam_step": torch.tensor(self._adam_step())}
        for name, p in self._trainable:
            state[f"fp32.{name}"] = self._shard(p, own(safe_get_local_fp32_param(p)))
            for key in _MOMENTS:
                state[f"{key}.{name}"] = self._shard(p, own(safe_get_local_optimizer_state(p, key)))
        self.writer.save(path, self.rank, state, local_state(self.scheduler, self.device), blocking)

    def save_done(self, wait: bool = False) -> bool:
        return self.writer.done(wait)

    def load(self, path: str) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        self.writer.done(wait=True)

        state: dict[str, Any] = {"adam_step": torch.tensor(0)}
        buffers = []
        for name, p in self._trainable:
            for key in ("fp32", *_MOMENTS):
                buf = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=self.device)
                state[f"{key}.{name}"] = self._shard(p, buf)  # DCP reads into buf in place
                buffers.append((key, p, buf))
        dcp.load(state, checkpoint_id=path)
        self.zero.checkpoint_event_prologue()  # release gathered copies; partitions are the truth
        for key, p, buf in buffers:
            if key == "fp32":
                safe_set_local_fp32_param(p, buf)
                p.ds_tensor.data.copy_(buf)  # the compute copy (bf16, or offloaded) follows the master
            else:
                safe_set_local_optimizer_state(p, buf, key)
        for flat in self.zero.fp32_partitioned_groups_flat:
            self._set_adam_step(self.optimizer.state[flat], int(state["adam_step"]))
        self.zero.checkpoint_event_epilogue()  # re-gather persistent (small) parameters
        load_local_state(path, self.rank, self.scheduler, self.device)
        # A scheduler sets the groups' lr only when it steps; the resumed step needs it now.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def barrier(self) -> None:
        dist.barrier()
