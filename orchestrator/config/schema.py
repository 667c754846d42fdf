"""Typed schemas for every config group.

Defaults live here and only here; the YAML files under ``conf/`` set values. Each group
option is validated against its dataclass when Hydra composes the config, so an unknown
key or a wrong type fails before anything starts. Options of one group that need
different fields (``method=full`` vs ``method=lora``) get their own dataclass, so a
LoRA-only key used with ``method=full`` is an unknown key, not a silently ignored one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    """Label used in run names and logs."""
    pretrained: Optional[str] = None
    """Hugging Face hub id or local directory. None: build from `arch` with random init."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for `pretrained`."""
    tokenizer: Optional[str] = None
    """Tokenizer hub id or directory. None: `pretrained`, or the built-in byte tokenizer."""
    chat_template: Optional[str] = None
    """Jinja chat template overriding the tokenizer's own."""
    arch: str = "llama"
    """Architecture for locally built models: llama | qwen3_moe | mixtral."""
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    num_experts: int = 0
    """Experts per MoE layer (locally built MoE models only)."""
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    dtype: str = "auto"
    """Parameter dtype: auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2."""
    trust_remote_code: bool = False
    init_seed: int = 1234
    """Seed for random init of locally built models (same on every rank)."""


# -------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    name: str = MISSING


@dataclass
class FullMethodConfig(MethodConfig):
    name: str = "full"


@dataclass
class LoraMethodConfig(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """Module names, or ["all-linear"] for every linear layer except the output head."""
    bias: str = "none"
    export_merged: bool = False
    """Also export the base model with the adapter merged in (`hf_merged/`)."""


# --------------------------------------------------------------------------- stage
@dataclass
class StageConfig:
    name: str = MISSING


@dataclass
class SftStageConfig(StageConfig):
    name: str = "sft"
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (default: completion tokens only)."""


# ------------------------------------------------------------------------- backend
@dataclass
class BackendConfig:
    name: str = MISSING


@dataclass
class Fsdp2BackendConfig(BackendConfig):
    name: str = "fsdp2"
    reshard_after_forward: bool = True
    """ZeRO-3 style (True) or ZeRO-2 style (False: keep params gathered until backward)."""
    mixed_precision: str = "auto"
    """auto (bf16 compute on GPU, fp32 on CPU) | bf16 | fp32."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward to save activation memory."""


# ------------------------------------------------------------------------- cluster
@dataclass
class ClusterConfig:
    name: str = MISSING
    num_workers: int = 2
    """Training worker actors (one per GPU, or per CPU slot on CPU)."""
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    placement_strategy: str = "PACK"
    """Ray placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD."""
    placement_timeout_s: int = 120
    """How long to wait for the cluster to have room for all workers."""
    dist_timeout_s: int = 600
    """torch.distributed collective timeout."""


@dataclass
class LocalClusterConfig(ClusterConfig):
    name: str = "local"
    num_cpus: Optional[int] = None
    """CPUs for the in-process Ray cluster (None: all)."""


@dataclass
class RayClusterConfig(ClusterConfig):
    name: str = "ray"
    address: str = "auto"
    """Address of a running Ray cluster (`auto` finds the one on this node)."""


# ---------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    source: str = MISSING
    """JSONL or Parquet file, `hf:<dataset id>`, or `synthetic:<generator>`."""
    split: str = "train"
    """Split for `hf:` sources."""
    format: str = "auto"
    """auto | messages | prompt_completion."""
    num_samples: int = 0
    """Rows to use (generators: rows to generate). 0: all."""
    max_seq_len: int = 512
    batching: str = "packed"
    """packed (concatenate examples into max_seq_len rows) | padded (one example per row)."""
    group_by_length: bool = True
    """For `padded`: batch examples of similar length together to cut padding."""
    shuffle: bool = True
    seed: int = 0
    on_bad_rows: str = "error"
    """error | skip (skip malformed rows, up to `max_bad_rows_fraction`)."""
    max_bad_rows_fraction: float = 0.01
    truncate: bool = True
    """Truncate over-long examples to max_seq_len (False: treat them as bad rows)."""


# -------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "orchestrator"
    entity: Optional[str] = None
    mode: str = "auto"
    """auto (online with an API key, else offline) | online | offline | disabled."""
    tags: List[str] = field(default_factory=list)
    log_every: int = 1
    """Console/W&B log interval in steps (the metrics JSONL gets every step)."""


# ---------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointConfig:
    every_steps: int = 50
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to retain (older ones are deleted after a new one commits)."""
    resume: str = "auto"
    """auto (latest complete checkpoint if any) | must (fail without one) | never."""
    dir: Optional[str] = None
    """Checkpoint directory; None: <run dir>/checkpoints. Must be shared storage on multi-node."""
    export_hf: bool = True
    """Export a Hugging Face model (or PEFT adapter) at the end of the run."""
    save_final: bool = True


# --------------------------------------------------------------------- train / run
@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps; 0: `epochs` passes over the data."""
    epochs: int = 1
    global_batch_size: int = 8
    """Rows (packed rows, or examples) per optimizer step, across all workers."""
    micro_batch_size: int = 2
    """Rows per forward/backward on one worker; the rest is gradient accumulation."""
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    scheduler: str = "cosine"
    """cosine | linear | constant."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    seed: int = 0
    on_nonfinite: str = "skip"
    """Non-finite loss or grad norm on any rank: skip (no rank updates) | stop."""


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "outputs/${run.name}"
    """Run directory: config, metrics, logs, checkpoints, exports. Same dir = auto-resume."""
    callbacks: List[str] = field(default_factory=list)
    """Import paths `module:object` of callbacks with on_step_end(step, metrics) hooks."""


@dataclass
class Config:
    model: Any = MISSING
    method: Any = MISSING
    stage: Any = MISSING
    backend: Any = MISSING
    cluster: Any = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    extra: Dict[str, Any] = field(default_factory=dict)
    """Free-form values for user callbacks and reward functions."""


# Group option schemas: (group, option name in conf/<group>/<name>.yaml) -> dataclass.
# The YAML of each option starts from `/schema/<group>/<schema>` in its defaults list.
GROUP_SCHEMAS: Dict[str, Dict[str, type]] = {
    "model": {"model": ModelConfig},
    "method": {"full": FullMethodConfig, "lora": LoraMethodConfig},
    "stage": {"sft": SftStageConfig},
    "backend": {"fsdp2": Fsdp2BackendConfig},
    "cluster": {"local": LocalClusterConfig, "ray": RayClusterConfig},
    "data": {"data": DataConfig},
    "logger": {"logger": LoggerConfig},
    "checkpoint": {"checkpoint": CheckpointConfig},
}
