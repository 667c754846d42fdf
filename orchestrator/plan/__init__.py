"""Preflight plan of a run: memory per device by role and component, a fit verdict with
stated headroom, host RAM and disk needs, a step-time estimate, and what to change when it
does not fit. Built from the config alone (shapes on the meta device, no weights).

`python -m orchestrator.plan +experiment=sft_lora plan.device=h100_80gb` prints it; the
launchers call :func:`preflight` before they submit. The memory model is documented in
orchestrator/plan/memory.py.

Step time: 2*P_active forward + 2*P_active backward (input gradients) + 2*T_active (weight
gradients, trainable only) FLOPs per token, + 2*P_active when activations are recomputed,
+ 12*L*a*d*s per token for attention (fwd+bwd, PaLM appendix B), divided by
`num_workers x peak bf16 FLOP/s x plan.mfu`. Generation time of RL stages is not included.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field

from orchestrator.errors import ConfigError
from orchestrator.plan import memory
from orchestrator.plan.devices import GIB, Device, device_spec
from orchestrator.plan.memory import Component, Layout
from orchestrator.plan.shapes import Shapes, shapes

log = logging.getLogger(__name__)

CUDA_CONTEXT = 1 * GIB
"""CUDA context and kernels loaded per process (~0.5-1 GiB; we take 1 GiB)."""
NCCL_BUFFERS = GIB // 2
"""NCCL communicator buffers with more than one worker."""


@dataclass
class Plan:
    device: str
    device_memory: int
    num_workers: int
    micro_batch: int
    checkpointing: bool
    components: list[Component]
    headroom: list[Component]
    device_total: int
    fits: bool
    host_per_worker: int
    disk: int
    step_time_s: float
    eta_s: float | None
    params: int
    trainable: int
    rollout_fits: bool = True
    suggestions: list[str] = field(default_factory=list)
    fit_micro_batch: int | None = None
    """Largest micro-batch that fits with the other settings unchanged (None: none does)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def layout(cfg) -> Layout:
    return Layout(cfg.cluster.num_workers, cfg.train.micro_batch_size, bool(cfg.backend.activation_checkpointing))


def _headroom(cfg, dev: Device, lay: Layout) -> list[Component]:
    if not dev.gpu:
        return []
    rows = [Component("headroom", "CUDA context", CUDA_CONTEXT, note="per process")]
    if lay.num_workers > 1:
        rows.append(Component("headroom", "NCCL buffers", NCCL_BUFFERS))
    frag = cfg.plan.fragmentation
    rows.append(Component("headroom", "fragmentation", int(frag * dev.memory), note=f"{frag:.0%} of the device"))
    return rows


def _step_time(cfg, sh: Shapes, dev: Device, lay: Layout) -> float:
    rows, seq = memory.sequence(cfg)
    rl = cfg.stage.name in memory.RL_STAGES
    batch = cfg.stage.prompts_per_step * cfg.rollout.n if rl else cfg.train.global_batch_size
    tokens = batch * rows * seq
    trainable_active = min(sh.trainable, sh.active_params)
    per_token = 4 * sh.active_params + 2 * trainable_active + (2 * sh.active_params if lay.checkpointing else 0)
    per_token += 12 * sh.layers * sh.heads * sh.head_dim * seq
    return per_token * tokens / (lay.num_workers * dev.peak_flops * cfg.plan.mfu)


def _disk(cfg, sh: Shapes) -> int:
    mb = memory.master_bytes(cfg)
    state = sh.trainable * (mb + 2 * mb)  # trained weights + AdamW moments
    if cfg.method.name in ("full", "bitfit", "experts"):
        state += (sh.params - sh.trainable) * mb
    export = sh.params * mb if cfg.checkpoint.export_hf else 0
    return state * cfg.checkpoint.keep_last + export


def estimate(cfg, sh: Shapes | None = None, lay: Layout | None = None) -> Plan:
    """The plan of `cfg` (optionally with another layout), without suggestions."""
    sh = sh or shapes(cfg.model, cfg.method)
    lay = lay or layout(cfg)
    dev = device_spec(cfg.plan.device, cfg)
    comps = memory.training(cfg, sh, dev, lay) + memory.reference(cfg, sh, dev, lay)
    comps += memory.learned_roles(cfg, sh, dev, lay) + memory.rollout(cfg, sh, dev)
    head = _headroom(cfg, dev, lay)
    on_train = [c for c in comps if c.where == "device" and c.role != "rollout (own device)"]
    total = sum(c.bytes for c in on_train + head)
    rollout_fits = True
    own = [c for c in comps if c.role == "rollout (own device)"]
    if own and dev.gpu:
        weights = sum(c.bytes for c in own if "weights" in c.name)
        kv = memory.kv_tokens(cfg, sh, dev, comps)
        if kv is None:  # the hf engine: its weights and KV cache of a whole batch on the device
            rollout_fits = sum(c.bytes for c in own) + CUDA_CONTEXT <= dev.memory
        else:  # vLLM: weights within its share, room for one max_model_len sequence
            rollout_fits = weights + CUDA_CONTEXT <= cfg.rollout.gpu_memory_utilization * dev.memory and (
                kv >= (cfg.rollout.max_model_len or memory.sequence(cfg)[1])
            )
    host = sum(c.bytes for c in comps if c.where == "host") + sh.params * memory.master_bytes(cfg)
    step = _step_time(cfg, sh, dev, lay)
    return Plan(
        device=dev.name,
        device_memory=dev.memory,
        num_workers=lay.num_workers,
        micro_batch=lay.micro_batch,
        checkpointing=lay.checkpointing,
        components=comps,
        headroom=head,
        device_total=total,
        fits=total <= dev.memory and rollout_fits,
        host_per_worker=host,
        disk=_disk(cfg, sh),
        step_time_s=step,
        eta_s=step * cfg.train.max_steps if cfg.train.max_steps else None,
        params=sh.params,
        trainable=sh.trainable,
        rollout_fits=rollout_fits,
    )


def _micro_batches(cfg, n: int) -> list[int]:
    """Micro-batches that divide each worker's share of the global batch, largest first."""
    per_rank = max(cfg.train.global_batch_size // n, 1)
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def _largest_fit(cfg, sh: Shapes, n: int, ckpt: bool) -> int | None:
    for mb in _micro_batches(cfg, n):
        if estimate(cfg, sh, Layout(n, mb, ckpt)).fits:
            return mb
    return None


def plan(cfg) -> Plan:
    """The plan of `cfg` with suggestions when it does not fit."""
    sh = shapes(cfg.model, cfg.method)
    p = estimate(cfg, sh)
    lay = layout(cfg)
    p.fit_micro_batch = _largest_fit(cfg, sh, lay.num_workers, lay.checkpointing)
    if p.fits:
        return p
    if not p.rollout_fits and str(cfg.rollout.engine) == "vllm":
        p.suggestions.append(
            "the rollout engine's model and one max_model_len sequence of KV cache do not fit "
            "rollout.gpu_memory_utilization of a device: raise it or rollout.tensor_parallel_size"
        )
    elif not p.rollout_fits:
        p.suggestions.append(
            "the hf rollout engine's model and the KV cache of a batch do not fit its device: lower "
            "rollout.batch_size or use rollout.engine=vllm"
        )
    vllm = [c for c in p.components if c.role == "rollout" and c.name.startswith("vllm")]
    if vllm and p.device_memory:
        train = p.device_total - sum(c.bytes for c in vllm)
        share = int(100 * (p.device_memory - train) / p.device_memory) / 100
        if share > 0.05:
            p.suggestions.append(f"rollout.gpu_memory_utilization={share} (what training leaves of the shared GPU)")
    if p.fit_micro_batch is not None and p.fit_micro_batch < lay.micro_batch:
        p.suggestions.append(
            f"train.micro_batch_size={p.fit_micro_batch} (largest that fits; plan.auto=true applies it)"
        )
    if not lay.checkpointing:
        mb = _largest_fit(cfg, sh, lay.num_workers, True)
        if mb is not None:
            p.suggestions.append(
                f"backend.activation_checkpointing=true (fits with train.micro_batch_size={min(mb, lay.micro_batch)})"
            )
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if (
            n > lay.num_workers
            and estimate(cfg, sh, Layout(n, min(lay.micro_batch, _micro_batches(cfg, n)[0]), lay.checkpointing)).fits
        ):
            p.suggestions.append(f"cluster.num_workers={n} (shards model state {n} ways)")
            break
    if cfg.method.name in ("lora", "qlora") and memory.master_bytes(cfg) == 4:
        alt = copy.deepcopy(cfg)
        alt.model.dtype = "bfloat16"
        if estimate(alt, sh, lay).fits:
            p.suggestions.append("model.dtype=bfloat16 (the frozen base in bf16 instead of fp32)")
    if cfg.method.name == "full":
        for name in ("lora", "qlora"):
            alt = _with_method(cfg, name)
            if alt is None:
                continue
            q = estimate(alt, shapes(alt.model, alt.method), Layout(lay.num_workers, 1, True))
            if q.fits:
                p.suggestions.append(f"method={name} (fits with train.micro_batch_size=1 and activation checkpointing)")
                break
    if not p.suggestions:
        p.suggestions.append("nothing tried fits: a larger device (plan.device), offload, or a smaller model")
    return p


def _with_method(cfg, name: str):
    from orchestrator.config.schema import GROUP_SCHEMAS

    alt = copy.deepcopy(cfg)
    alt.method = GROUP_SCHEMAS["method"][name]()
    if name == "qlora" and str(alt.backend.name) != "fsdp2":
        return None
    return alt


def render(p: Plan) -> str:
    """The plan as a text table with the verdict and suggestions."""
    lines = [
        f"memory plan: {p.params / 1e9:.3f}B parameters ({p.trainable:,} trainable), "
        f"{p.num_workers} worker(s), micro-batch {p.micro_batch}, activation checkpointing "
        f"{'on' if p.checkpointing else 'off'}",
        f"{'role':<22}{'component':<22}{'bytes/device':>16}  {'human':>11}  note",
    ]
    for c in p.components + p.headroom:
        where = "" if c.where == "device" else " [host]"
        lines.append(f"{c.role:<22}{c.name + where:<22}{c.bytes:>16,}  {fmt_bytes(c.bytes):>11}  {c.note}")
    lines.append(f"{'total on a training device':<44}{p.device_total:>16,}  {fmt_bytes(p.device_total):>11}")
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines.append(
        f"verdict: {verdict} on {p.device} ({fmt_bytes(p.device_memory)}; "
        f"{p.device_total / p.device_memory:.0%} used)"
        + ("" if p.rollout_fits else "; the rollout device does not fit")
    )
    lines.append(f"host RAM per worker: {fmt_bytes(p.host_per_worker)} (full model while loading + offloaded state)")
    lines.append(f"disk: {fmt_bytes(p.disk)} (checkpoints x checkpoint.keep_last + HF export)")
    eta = f", {fmt_time(p.eta_s)} for train.max_steps" if p.eta_s else ""
    lines.append(f"step time: {fmt_time(p.step_time_s)} per optimizer step at plan.mfu{eta}")
    if p.suggestions:
        lines.append("to make it fit, any of:")
        lines += [f"  - {s}" for s in p.suggestions]
    return "\n".join(lines)


def preflight(cfg) -> Plan | None:
    """Run the plan before a launcher submits: stop with the table when it does not fit
    (unless plan.enforce=false); with plan.auto=true lower train.micro_batch_size to the
    largest that fits. None when the model's shapes cannot be known here (logged)."""
    from orchestrator.errors import ModelLoadError

    try:
        p = plan(cfg)
    except ModelLoadError as exc:
        log.warning("memory plan skipped: %s", exc)
        return None
    if cfg.plan.auto and p.fit_micro_batch is not None and p.fit_micro_batch != cfg.train.micro_batch_size:
        log.info("plan.auto: train.micro_batch_size %d -> %d", cfg.train.micro_batch_size, p.fit_micro_batch)
        cfg.train.micro_batch_size = p.fit_micro_batch
        p = plan(cfg)
    if p.fits:
        log.info(
            "memory plan: %s of %s per device on %s", fmt_bytes(p.device_total), fmt_bytes(p.device_memory), p.device
        )
        return p
    if cfg.plan.enforce:
        raise ConfigError(f"the run does not fit its devices (plan.enforce=false submits anyway)\n{render(p)}")
    log.warning("memory plan: does not fit (submitting anyway, plan.enforce=false)\n%s", render(p))
    return p


__all__ = ["Plan", "estimate", "plan", "preflight", "render"]
