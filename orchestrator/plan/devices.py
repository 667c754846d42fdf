"""Devices the plan knows: memory per device and peak dense bf16 FLOP/s (vendor data sheets)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.errors import ConfigError

GB = 1e9
GIB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    memory: int
    """Bytes per device."""
    peak_flops: float
    """Dense bf16 FLOP/s (no sparsity)."""
    gpu: bool = True


def host_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Peak dense bf16: H100 SXM 989 TFLOP/s, H200 SXM 989, A100 312 (NVIDIA data sheets).
# Usable memory: the data sheets' GB figures are the HBM sizes the driver reports as GiB.
DEVICES: dict[str, Device] = {
    "h100_80gb": Device("h100_80gb", 80 * GIB, 989e12),
    "h200_141gb": Device("h200_141gb", 141 * GB, 989e12),
    "a100_40gb": Device("a100_40gb", 40 * GIB, 312e12),
    "a100_80gb": Device("a100_80gb", 80 * GIB, 312e12),
    # A CPU worker's "device" is the host: memory is this machine's RAM; ~1 TFLOP/s of fp32 is a
    # generous figure for a many-core server, only the order of magnitude matters here.
    "cpu": Device("cpu", 0, 1e12, gpu=False),
}


def local_gpu() -> Device | None:
    """This machine's first GPU (the run's driver on a GPU node plans for the GPUs it sees),
    with the peak FLOP/s of the known device of the same family; None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
    except Exception:  # no driver, no device: plan for the named default instead
        return None
    family = "a100" if "A100" in props.name else "h100"
    return Device(props.name, int(props.total_memory), DEVICES[f"{family}_80gb"].peak_flops)


def device_spec(name: str, cfg) -> Device:
    """The device `plan.device` names (`auto`: this machine's GPU when it has one, else by
    cluster.gpus_per_worker an H100 or the host), with
    `plan.device_memory_gb` applied."""
    if name == "auto":
        local = local_gpu() if cfg.cluster.gpus_per_worker > 0 else None
        if local is not None and cfg.plan.device_memory_gb is None:
            return local
        name = "h100_80gb" if cfg.cluster.gpus_per_worker > 0 else "cpu"
    if name not in DEVICES:
        raise ConfigError(
            f"plan.device={name!r} is not a known device. Valid devices: auto, {', '.join(DEVICES)}; "
            "or set plan.device_memory_gb=N for another one"
        )
    dev = DEVICES[name]
    memory = dev.memory or host_memory()
    if cfg.plan.device_memory_gb is not None:
        memory = int(cfg.plan.device_memory_gb * GB)
    return Device(dev.name, memory, dev.peak_flops, dev.gpu)
