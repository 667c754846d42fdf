"""GPU fast paths of a model: the attention kernel (`model.attn_implementation=auto`), Liger
kernels (`train.kernels`) and per-block `torch.compile` (`train.compile`).

Packed rows carry per-example position ids (restarting at 0); `transformers` derives the
example boundaries from them. With sdpa and eager it builds a full [B, 1, L, L] mask; with
flash_attention_2 it calls the varlen kernel on the examples' lengths, and with
flex_attention it builds a block-sparse `BlockMask`: neither materialises an L x L mask.

Liger and compile act on the `transformers` model before the engine shards it, in the order torchtitan
uses: kernels replace modules first, activation checkpointing wraps the blocks, then each
decoder block is compiled on its own, then FSDP2 / ZeRO-3 wrap the compiled blocks.
Compiling block by block (not the whole model) keeps one small graph that every layer
reuses, and leaves the sharding hooks between blocks outside the graphs.

Liger's kernels are Triton kernels for CUDA: on a machine without a CUDA GPU, or without
the `liger-kernel` package, `train.kernels=liger` stops the run when the config is
validated (`liger_problem`), and again when a worker builds its model.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from orchestrator.errors import ConfigError
from orchestrator.methods.base import unwrap

LIGER_FIX = (
    'install Liger with `pip install -e ".[liger]"` (or `pip install liger-kernel`) and run the workers on '
    "CUDA GPUs (cluster.gpus_per_worker>=1), or set train.kernels=none"
)
"""What to do when `train.kernels=liger` cannot run: one sentence every refusal ends with."""

_FUSED_CE = "_orchestrator_liger_fused_ce"
"""Attribute set on a model whose token log-probs go through Liger's fused linear cross-entropy."""


def attn_implementation(name: str, on_gpu: bool, packed_rows: bool = True) -> str:
    """The `transformers` attention implementation for `model.attn_implementation=name`.

    auto: flash_attention_2 on a GPU where `flash_attn` is installed, else (for a model that
    reads packed rows: training, log-probs) flex_attention on a GPU, else sdpa. On CPU
    flex_attention works too but compiles its kernel first, and sdpa keeps the CPU runs as
    they were. Generation (`packed_rows=False`: left-padded prompts, a KV cache) has no
    packed rows, and sdpa serves it without flex attention's compiles per shape."""
    if name != "auto":
        return name
    if not on_gpu:
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if packed_rows else "sdpa"


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the modules whose class `transformers` names in
    `_no_split_modules` (the unit FSDP2 shards and torch.compile compiles)."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every decoder block in place.

    `Module.compile` keeps each block's class and parameter names (`torch.compile(block)`
    would wrap it and add `_orig_mod.` to every state-dict key, breaking checkpoints and
    the weights sent to inference)."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(
            f"train.compile=true: {type(unwrap(model)).__name__} names no decoder block class in "
            "`_no_split_modules`, so there is nothing to compile block by block; set train.compile=false"
        )
    for block in blocks:
        block.compile()


def liger_problem(gpus_per_worker: int) -> Optional[str]:
    """Why `train.kernels=liger` cannot run with workers of `gpus_per_worker` GPUs (None: it can)."""
    problems = []
    if importlib.util.find_spec("liger_kernel") is None:
        problems.append("the liger-kernel package is not installed")
    if gpus_per_worker < 1:
        problems.append("the workers have no GPU (cluster.gpus_per_worker=0), and Liger's kernels run on CUDA only")
    return "; ".join(problems) or None


def apply_liger(model: torch.nn.Module, device: torch.device) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on the model, through Liger's own instance
    patching, and its fused linear cross-entropy for token log-probs (`uses_fused_ce`).

    Liger's patch of the model's forward (`fused_linear_cross_entropy=True`) only fuses when
    `labels` are passed and returns a mean loss; every objective here needs per-token
    log-probs, so the forward stays the model's own and `orchestrator.models.logprobs`
    calls the fused function itself."""
    if device.type != "cuda":
        raise ConfigError(f"train.kernels=liger needs a CUDA device, this worker runs on {device.type}: {LIGER_FIX}")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ConfigError(f"train.kernels=liger: liger-kernel cannot be imported ({exc}): {LIGER_FIX}") from exc
    base = unwrap(model)
    model_type = base.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(
            f"train.kernels=liger: Liger has no kernels for model type {model_type!r} "
            f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set train.kernels=none"
        )
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](
        model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    mark_fused_ce(base)


def mark_fused_ce(model: torch.nn.Module) -> None:
    """Token log-probs of `model` go through Liger's fused linear cross-entropy from now on."""
    setattr(unwrap(model), _FUSED_CE, True)


def uses_fused_ce(model: torch.nn.Module) -> bool:
    """Whether `apply_liger` ran on this model (its log-probs take Liger's fused linear CE)."""
    return getattr(unwrap(model), _FUSED_CE, False)
