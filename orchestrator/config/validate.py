"""Cross-field checks that types alone cannot express. Runs before any worker starts.

Each failure raises ConfigError naming the key, the bad value and what to do instead.
"""

from __future__ import annotations

import re
from typing import Iterable

from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError


def _choice(value, key: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid. Valid values: {', '.join(map(str, choices))}")


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> None:
    from orchestrator.models import ARCHITECTURES  # registries are the source of valid names

    m = cfg.model
    _choice(m.dtype, "model.dtype", ["auto", "float32", "bfloat16", "float16"])
    _choice(m.attn_implementation, "model.attn_implementation", ["sdpa", "eager", "flash_attention_2"])
    if m.pretrained is None:
        _choice(m.arch, "model.arch", ARCHITECTURES)
        if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} must divide by model.num_heads={m.num_heads}, "
                f"and num_heads by model.num_kv_heads={m.num_kv_heads}")

    d = cfg.data
    _choice(d.format, "data.format", ["auto", "messages", "prompt_completion"])
    _choice(d.batching, "data.batching", ["packed", "padded"])
    _choice(d.on_bad_rows, "data.on_bad_rows", ["error", "skip"])
    _positive(d.max_seq_len, "data.max_seq_len")
    if not 0 <= d.max_bad_rows_fraction <= 1:
        raise ConfigError(f"data.max_bad_rows_fraction={d.max_bad_rows_fraction} must be in [0, 1]")

    t = cfg.train
    _choice(t.scheduler, "train.scheduler", ["cosine", "linear", "constant"])
    _choice(t.on_nonfinite, "train.on_nonfinite", ["skip", "stop"])
    _positive(t.lr, "train.lr")
    _positive(t.max_steps, "train.max_steps", allow_zero=True)
    _positive(t.epochs, "train.epochs")
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.global_batch_size, "train.global_batch_size")
    n = cfg.cluster.num_workers
    _positive(n, "cluster.num_workers")
    if t.global_batch_size % n:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"cluster.num_workers={n} (each worker trains an equal share of every batch)")
    per_rank = t.global_batch_size // n
    if per_rank % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size / cluster.num_workers = {per_rank} rows per worker is not a "
            f"multiple of train.micro_batch_size={t.micro_batch_size}; pick a micro batch that divides it")

    c = cfg.cluster
    _choice(c.placement_strategy, "cluster.placement_strategy",
            ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    _positive(c.cpus_per_worker, "cluster.cpus_per_worker")
    _positive(c.gpus_per_worker, "cluster.gpus_per_worker", allow_zero=True)
    if c.name == "local" and c.gpus_per_worker > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"cluster.gpus_per_worker={c.gpus_per_worker} but this machine has no CUDA GPU. "
                "Use cluster.gpus_per_worker=0 to train on CPU (or debug=cpu), or run on a GPU node.")
        if n * c.gpus_per_worker > torch.cuda.device_count():
            raise ConfigError(
                f"cluster.num_workers={n} x cluster.gpus_per_worker={c.gpus_per_worker} GPUs requested "
                f"but this machine has {torch.cuda.device_count()}")

    if cfg.backend.name == "fsdp2":
        _choice(cfg.backend.mixed_precision, "backend.mixed_precision", ["auto", "bf16", "fp32"])

    ck = cfg.checkpoint
    _choice(ck.resume, "checkpoint.resume", ["auto", "must", "never"])
    _positive(ck.keep_last, "checkpoint.keep_last")
    _positive(ck.every_steps, "checkpoint.every_steps", allow_zero=True)

    _choice(cfg.logger.mode, "logger.mode", ["auto", "online", "offline", "disabled"])
    for cb in cfg.run.callbacks:
        if not re.fullmatch(r"[\w.]+:[\w.]+", cb):
            raise ConfigError(f"run.callbacks entry {cb!r} must look like 'package.module:object'")

    if cfg.method.name == "lora":
        _positive(cfg.method.r, "method.r")
        if not cfg.method.target_modules:
            raise ConfigError("method.target_modules is empty; use [all-linear] or name modules, "
                              "e.g. [q_proj,v_proj]")
