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


# Kubernetes resource.Quantity, as in the CRD schemas (`x-kubernetes-int-or-string` pattern).
_K8S_QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                 r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (the forms `man sbatch` lists).
_SLURM_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                         r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def slurm_time_seconds(value: str) -> int | None:
    """Seconds in an sbatch --time value; None for UNLIMITED. ConfigError if malformed."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _SLURM_TIME.match(value)
    if not m:
        raise ConfigError(f"cluster.time={value!r} is not a Slurm time limit; use minutes (90), HH:MM:SS "
                          "(24:00:00), D-HH[:MM[:SS]] (2-00) or UNLIMITED")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        return g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    parts = [g[k] for k in ("a", "b", "c") if k in g]  # M | M:S | H:M:S
    return {1: lambda: parts[0] * 60, 2: lambda: parts[0] * 60 + parts[1],
            3: lambda: parts[0] * 3600 + parts[1] * 60 + parts[2]}[len(parts)]()


def _validate_launch_cluster(cfg: Config) -> None:
    """Checks of the submitting launchers' options that need nothing but the config (the
    launchers check what needs the cluster, e.g. a partition's GPUs, before submitting)."""
    c = cfg.cluster
    for key in getattr(c, "env", {}):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"cluster.env key {key!r} is not a valid environment variable name")
    if c.name in ("slurm", "kubernetes"):
        _positive(c.nodes, "cluster.nodes")
        _positive(c.gpus_per_node, "cluster.gpus_per_node", allow_zero=True)
        need, have = c.num_workers * c.gpus_per_worker, c.nodes * c.gpus_per_node
        if need > have:
            raise ConfigError(
                f"cluster.num_workers={c.num_workers} x cluster.gpus_per_worker={c.gpus_per_worker} = "
                f"{need} GPU(s) but the job asks for cluster.nodes={c.nodes} x cluster.gpus_per_node="
                f"{c.gpus_per_node} = {have}. Raise cluster.gpus_per_node / cluster.nodes, or lower "
                "cluster.num_workers (cluster.gpus_per_worker=0 trains on CPU).")
    if c.name == "slurm":
        _positive(c.cpus_per_node, "cluster.cpus_per_node", allow_zero=True)
        if c.cpus_per_node and c.num_workers * c.cpus_per_worker > c.nodes * c.cpus_per_node:
            raise ConfigError(
                f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} CPUs "
                f"do not fit in cluster.nodes={c.nodes} x cluster.cpus_per_node={c.cpus_per_node}")
        limit = slurm_time_seconds(c.time)
        if c.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(c.mem)):
            raise ConfigError(f"cluster.mem={c.mem!r} is not a Slurm memory size; use e.g. 64G, 500000M or 0 (all)")
        if not 0 <= c.signal_before_s <= 65535:
            raise ConfigError(f"cluster.signal_before_s={c.signal_before_s} must be in [0, 65535] (sbatch --signal)")
        if c.requeue and limit is not None and c.signal_before_s >= limit:
            raise ConfigError(
                f"cluster.signal_before_s={c.signal_before_s} is not shorter than cluster.time={c.time!r} "
                f"({limit}s): the job would be signalled before it starts. Lower it or raise cluster.time.")
        if not 1024 <= c.ray_port <= 65000:
            raise ConfigError(f"cluster.ray_port={c.ray_port} must be in [1024, 65000]")
        for arg in c.sbatch_args:
            if not arg.startswith("-"):
                raise ConfigError(f"cluster.sbatch_args entry {arg!r} must be an sbatch option (--name=value)")
    elif c.name == "ray_job":
        if not re.fullmatch(r"(https?://)?[\w.\-]+(:\d+)?/?|auto", c.address):
            raise ConfigError(f"cluster.address={c.address!r} is not a Ray Jobs API address; use the "
                              "dashboard's http://HOST:8265")
        _positive(c.entrypoint_num_cpus, "cluster.entrypoint_num_cpus", allow_zero=True)
    elif c.name == "kubernetes":
        _choice(c.image_pull_policy, "cluster.image_pull_policy", ["Always", "IfNotPresent", "Never"])
        if not c.image or re.search(r"\s", c.image):
            raise ConfigError(f"cluster.image={c.image!r} must name an image, e.g. registry/orchestrator:0.1")
        if not re.fullmatch(_DNS_LABEL, c.namespace):
            raise ConfigError(f"cluster.namespace={c.namespace!r} is not a valid Kubernetes namespace "
                              "(lowercase letters, digits and '-', at most 63)")
        for key in ("cpus_per_node", "memory_per_node", "head_cpus", "head_memory"):
            if not re.fullmatch(_K8S_QUANTITY, str(getattr(c, key))):
                raise ConfigError(f"cluster.{key}={getattr(c, key)!r} is not a Kubernetes quantity "
                                  "(e.g. 8, 500m, 64Gi)")
        if not c.shared_mount.startswith("/"):
            raise ConfigError(f"cluster.shared_mount={c.shared_mount!r} must be an absolute path")
        out = cfg.run.output_dir
        if out.startswith("/") and not (out + "/").startswith(c.shared_mount.rstrip("/") + "/"):
            raise ConfigError(
                f"run.output_dir={out!r} is not on the shared volume (cluster.shared_mount="
                f"{c.shared_mount!r}): checkpoints there would be lost with the pod. Use a relative "
                "run.output_dir (placed under the mount) or a path below the mount.")
        _positive(c.backoff_limit, "cluster.backoff_limit", allow_zero=True)


def validate(cfg: Config) -> None:
    from orchestrator.models import ARCHITECTURES  # registries are the source of valid names

    _validate_launch_cluster(cfg)  # first: the worker layout below may derive from it

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
    if cfg.stage.name == "grpo":
        _validate_grpo(cfg)
    elif t.global_batch_size % n:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"cluster.num_workers={n} (each worker trains an equal share of every batch)")
    per_rank = t.global_batch_size // n
    if cfg.stage.name != "grpo" and per_rank % t.micro_batch_size:
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
    if cfg.backend.name == "deepspeed_zero3":
        _validate_deepspeed(cfg.backend)

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
    if cfg.method.name == "experts":
        from orchestrator.methods.experts import check_config

        check_config(cfg)  # selection vs the model's real expert layout (built on meta)


# DeepSpeed keys the typed config owns -> where to set them instead (one source per setting).
_DS_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "backend.mixed_precision",
    "fp16": "backend.mixed_precision (bf16 or fp32; fp16 loss scaling is not supported)",
    "optimizer": "train.lr / train.adam_* / train.weight_decay",
    "scheduler": "train.scheduler / train.warmup_steps / train.min_lr_ratio",
    "zero_optimization.offload_optimizer.device": "backend.offload_optimizer",
    "zero_optimization.offload_param.device": "backend.offload_param",
}


def _validate_deepspeed(b) -> None:
    import importlib.util

    _choice(b.mixed_precision, "backend.mixed_precision", ["auto", "bf16", "fp32"])
    _choice(b.offload_optimizer, "backend.offload_optimizer", ["none", "cpu"])
    _choice(b.offload_param, "backend.offload_param", ["none", "cpu"])
    zero = b.extra.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"backend.extra.zero_optimization={zero!r} must be a mapping of ZeRO keys")
    if "stage" in zero and zero["stage"] != 3:
        raise ConfigError(
            f"backend.extra.zero_optimization.stage={zero['stage']}: backend=deepspeed_zero3 runs ZeRO "
            "stage 3 only (parameters, gradients and optimizer state all partitioned). Remove the key; "
            "to keep parameters gathered between forward and backward (ZeRO-2 style) use "
            "backend=fsdp2 backend.reshard_after_forward=false.")
    for key, instead in _DS_OWNED.items():
        node = b.extra
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if node != {}:
            raise ConfigError(f"backend.extra.{key} is generated from the typed config; set {instead} instead.")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError('backend=deepspeed_zero3 needs DeepSpeed, which is not installed. Install the extra: '
                          'pip install -e ".[deepspeed]" (or use backend=fsdp2).')


def _validate_grpo(cfg: Config) -> None:
    from orchestrator.algos.grpo import LOSS_AGGREGATIONS

    g, r = cfg.stage, cfg.stage.rollout
    _choice(g.loss_agg, "stage.loss_agg", LOSS_AGGREGATIONS)
    _choice(r.placement, "stage.rollout.placement", ["separate", "colocated"])
    _choice(r.engine, "stage.rollout.engine", ["hf", "vllm"])
    _positive(g.prompts_per_step, "stage.prompts_per_step")
    _positive(g.num_iterations, "stage.num_iterations")
    _positive(r.max_new_tokens, "stage.rollout.max_new_tokens")
    _positive(r.num_workers, "stage.rollout.num_workers")
    if r.n < 2:
        raise ConfigError(f"stage.rollout.n={r.n}: GRPO needs at least 2 completions per prompt "
                          "(advantages are relative to the group)")
    if r.temperature < 0:
        raise ConfigError(f"stage.rollout.temperature={r.temperature} must be >= 0")
    if not g.rewards:
        raise ConfigError("stage.rewards is empty; e.g. stage.rewards=[{name: math_verify}]")
    if r.engine == "vllm":
        raise ConfigError("stage.rollout.engine=vllm is not available in this version; use "
                          "stage.rollout.engine=hf")
    m = cfg.method
    pure_experts = m.name == "experts" and not (m.train_router or m.train_attention or m.train_shared_experts)
    if g.kl_coef > 0 and not (m.name == "lora" or pure_experts):
        raise ConfigError(
            f"stage.kl_coef={g.kl_coef} needs a reference policy; it is supported with method=lora and "
            "with method=experts training experts only (the base is recovered by disabling the "
            "adapters/slices, no second copy). Use stage.kl_coef=0 (as DAPO and Dr. GRPO do) or "
            "one of those methods.")
