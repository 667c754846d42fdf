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

from omegaconf import MISSING, OmegaConf


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


@dataclass
class ExpertsMethodConfig(MethodConfig):
    """MoE expert-targeted training: only the selected experts' slices train (ESFT-style)."""

    name: str = "experts"
    experts: Any = None
    """Experts to train. null: choose from router statistics on the training data. A list
    ([1, 3]): these experts in every MoE layer. A dict ({0: [1, 3], 5: [0]}): per decoder
    layer; unlisted layers train none. A string: path of an experts_selection.json."""
    score: str = "token"
    """Router statistic for automatic selection: token (share of routed tokens, ESFT-Token) |
    gate (share of routing weight, ESFT-Gate)."""
    threshold: float = 0.2
    """Per layer, take top-scoring experts until their cumulative share reaches this (ESFT top_p)."""
    max_per_layer: int = 0
    """Cap on automatically selected experts per layer (0: no cap)."""
    stats_tokens: int = 8192
    """Training-data tokens the router statistics are measured on."""
    train_router: bool = False
    """Also train the routers (whole)."""
    train_attention: bool = False
    """Also train the attention blocks (whole)."""
    train_shared_experts: bool = False
    """Also train shared experts (Qwen2-MoE / DeepSeek style), where the model has them."""


# --------------------------------------------------------------------------- stage
@dataclass
class StageConfig:
    name: str = MISSING
    cpu_warmup: Optional[str] = None
    """Run chained before this stage under debug=cpu (`experiment:NAME`): a randomly
    initialised tiny model must first learn the task format before RL can improve it."""


@dataclass
class SftStageConfig(StageConfig):
    name: str = "sft"
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (default: completion tokens only)."""


@dataclass
class RolloutConfig:
    n: int = 8
    """Completions per prompt (the GRPO group size G)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    """Extra stop strings (generation always stops at the tokenizer's EOS)."""
    engine: str = "hf"
    """hf (transformers generate with KV cache) | vllm (GPU, when vLLM is installed)."""
    placement: str = "separate"
    """separate (own actors and resources) | colocated (share the train workers' bundles)."""
    num_workers: int = 1
    """Rollout actors for placement=separate (colocated: one per train worker)."""
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    batch_size: int = 64
    """Prompts per generate call on one rollout worker."""


@dataclass
class RewardSpec:
    name: str = MISSING
    """A built-in (math_verify, exact_match, format) or an import path `module:function`."""
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the function (e.g. `pattern` for `format`)."""


@dataclass
class GrpoStageConfig(StageConfig):
    name: str = "grpo"
    prompts_per_step: int = 32
    """Prompts per step; each gets rollout.n completions."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="math_verify")])
    reward_timeout_s: float = 10.0
    """A reward call making no progress this long is masked and the pool restarted."""
    reward_workers: int = 2
    std_normalize: bool = True
    """Divide advantages by the group std (GRPO); false is Dr. GRPO."""
    loss_agg: str = "seq_mean_token_mean"
    """seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    """Upper clip of the ratio (DAPO's clip-higher uses 0.28)."""
    kl_coef: float = 0.0
    """KL penalty to the reference policy, as a loss term (LoRA: the base with adapters off)."""
    filter_zero_std_groups: bool = False
    """Drop groups whose rewards are all equal (DAPO dynamic sampling, without refill)."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (old log-probs recomputed on the trainer when > 1)."""
    eval_samples: int = 200
    """Held-out prompts scored greedily before training, every eval_every steps and at the end."""
    eval_every: int = 0
    eval_reward: str = "math_verify"
    log_samples_every: int = 10
    """Log a table of sample completions every N steps (0: never)."""


# ------------------------------------------------------------------------- backend
@dataclass
class BackendConfig:
    name: str = MISSING


@dataclass
class Fsdp2BackendConfig(BackendConfig):
    name: str = "fsdp2"
    reshard_after_forward: bool = True
    """ZeRO-3 style (True) or ZeRO-2 style (False: keep params gathered until backward)."""
    shard_single_rank: bool = False
    """With one worker, wrap the model in FSDP2 anyway (default: train the plain module, which
    is faster and computes the same; bf16 compute then uses torch.autocast)."""
    mixed_precision: str = "auto"
    """auto (bf16 compute on GPU, fp32 on CPU) | bf16 | fp32."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward to save activation memory."""


@dataclass
class DeepSpeedBackendConfig(BackendConfig):
    """DeepSpeed ZeRO-3 (`pip install -e ".[deepspeed]"`). Batch sizes, clipping, precision,
    optimizer and schedule come from `train.*` and the fields below, never from `extra`."""

    name: str = "deepspeed_zero3"
    mixed_precision: str = "auto"
    """auto (bf16 compute with fp32 master weights on GPU, fp32 on CPU) | bf16 | fp32."""
    offload_optimizer: str = "none"
    """ZeRO-Offload of the fp32 master weights and Adam state: none | cpu (DeepSpeedCPUAdam)."""
    offload_param: str = "none"
    """ZeRO-Infinity offload of the parameter partitions between uses: none | cpu."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward to save activation memory."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Any other DeepSpeed config keys, deep-merged over the generated config, e.g.
    `+backend.extra.zero_optimization.stage3_prefetch_bucket_size=5e7`."""


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


# Submitting launchers size the worker group from the allocation by default: one worker
# per GPU (4 nodes x 8 GPUs -> 32 workers of 1 GPU), or one per node on CPU-only nodes.
# Resolvers rather than code in the launcher, so `--cfg job` shows the numbers that run.
OmegaConf.register_new_resolver(
    "alloc_workers", lambda nodes, gpus: nodes * gpus if gpus else nodes, replace=True)
OmegaConf.register_new_resolver("alloc_gpus_per_worker", lambda gpus: 1 if gpus else 0, replace=True)


@dataclass
class SlurmClusterConfig(ClusterConfig):
    """sbatch a job that starts Ray on the allocation and runs the entry there (cluster=ray)."""

    name: str = "slurm"
    num_workers: int = "${alloc_workers:${.nodes},${.gpus_per_node}}"  # type: ignore[assignment]
    gpus_per_worker: int = "${alloc_gpus_per_worker:${.gpus_per_node}}"  # type: ignore[assignment]
    nodes: int = 1
    """Nodes to allocate: the Ray head (and the driver) on the first, Ray workers on all."""
    gpus_per_node: int = 0
    """GPUs per node (`--gpus-per-node`); 0 for CPU-only partitions."""
    cpus_per_node: int = 0
    """CPUs per node (`--cpus-per-task`, one task per node); 0: the partition's default."""
    mem: Optional[str] = None
    """Memory per node (`--mem`, e.g. 200G); None: the partition's default; 0: all of it."""
    partition: Optional[str] = None
    """Slurm partition (`--partition`); None: the cluster's default partition."""
    time: str = "01:00:00"
    """Time limit (`--time`): minutes, [D-]HH:MM[:SS] or UNLIMITED."""
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = False
    """Allocate whole nodes (`--exclusive`)."""
    job_name: Optional[str] = None
    """Job name; None: run.name."""
    requeue: bool = True
    """On the signal below or SIGTERM: checkpoint, then requeue the job; it resumes on restart."""
    signal_before_s: int = 300
    """Seconds before the time limit that Slurm sends SIGUSR1 to the batch script (0: none)."""
    sbatch_args: List[str] = field(default_factory=list)
    """Extra sbatch options, one per entry (e.g. [--constraint=h100, --reservation=r1])."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run first in the job script (module load, source a venv, ...); the other
    nodes' Ray workers inherit the environment they set up."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables exported in the job."""
    python: Optional[str] = None
    """Python on the nodes; None: the interpreter that submits (shared filesystem)."""
    ray_port: int = 6379
    """Ray head port; the head's other ports are the next few above it."""
    ray_start_timeout_s: int = 300
    """How long the script waits for every node to join the Ray cluster."""
    dry_run: bool = False
    """Render and print the sbatch script (and save it with the config) without submitting."""


@dataclass
class RayJobClusterConfig(ClusterConfig):
    """Submit the entry to a running Ray cluster through the Ray Jobs API."""

    name: str = "ray_job"
    address: str = "http://127.0.0.1:8265"
    """Ray Jobs API (dashboard) address of the cluster."""
    upload_code: bool = True
    """Upload this checkout's packages with the job (runtime_env py_modules); False: use
    the package installed on the cluster."""
    pip: List[str] = field(default_factory=list)
    """Extra pip requirements installed for the job (runtime_env pip)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables for the job (runtime_env env_vars)."""
    forward_env: List[str] = field(default_factory=lambda: ["WANDB_API_KEY", "WANDB_MODE", "HF_TOKEN"])
    """Variables copied from the submitting shell into the job when set there."""
    submission_id: Optional[str] = None
    """Job id; None: <run.name>-<time>."""
    entrypoint_num_cpus: float = 0
    """CPUs reserved for the driver process on the cluster."""
    follow: bool = False
    """Stream the job's logs until it ends; a failed job then fails this command."""


@dataclass
class KubernetesClusterConfig(ClusterConfig):
    """Render a KubeRay RayJob (ray.io/v1) running the entry in our image; apply on request."""

    name: str = "kubernetes"
    num_workers: int = "${alloc_workers:${.nodes},${.gpus_per_node}}"  # type: ignore[assignment]
    gpus_per_worker: int = "${alloc_gpus_per_worker:${.gpus_per_node}}"  # type: ignore[assignment]
    image: str = "orchestrator:latest"
    """Image built from docker/Dockerfile (the tag its build command gives); push it to a
    registry the cluster pulls from and name it here."""
    image_pull_policy: str = "IfNotPresent"
    namespace: str = "default"
    nodes: int = 1
    """Ray worker pods (the head pod only runs the driver)."""
    gpus_per_node: int = 0
    """nvidia.com/gpu per worker pod."""
    cpus_per_node: str = "8"
    """CPU request/limit per worker pod (Kubernetes quantity)."""
    memory_per_node: str = "32Gi"
    head_cpus: str = "2"
    head_memory: str = "8Gi"
    shared_pvc: str = "orchestrator-shared"
    """ReadWriteMany PersistentVolumeClaim for run directories (checkpoints, exports)."""
    shared_mount: str = "/mnt/shared"
    """Where the claim is mounted; a relative run.output_dir is placed under it."""
    wandb_secret: Optional[str] = "wandb"
    """Secret with key `api_key` exposed as WANDB_API_KEY (optional in the pod); None: none."""
    node_selector: Dict[str, str] = field(default_factory=dict)
    service_account: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables for every Ray container."""
    backoff_limit: int = 2
    """Times KubeRay retries a failed job; each retry resumes from the latest checkpoint."""
    ttl_s: int = 3600
    """Seconds the finished RayJob (and its logs) stays before deletion."""
    apply: bool = False
    """`kubectl apply` the rendered manifests (else only render and print them)."""
    context: Optional[str] = None
    """kubectl context; None: the current one."""


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
    async_save: bool = False
    """Copy the state in memory and write it from a background thread while training goes on
    (the directory is committed once every rank has written). The last save and a save on a
    stop signal are always written before the run goes on or exits."""


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
    max_restarts: int = 2
    """In-job recoveries from a dead worker (rebuild the group, reload the last checkpoint)."""
    init_from: Optional[str] = None
    """Start from another run's exported model: a run or model directory, or
    `experiment:NAME` to run that experiment first (reused when already complete)."""


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
    "method": {"full": FullMethodConfig, "lora": LoraMethodConfig, "experts": ExpertsMethodConfig},
    "stage": {"sft": SftStageConfig, "grpo": GrpoStageConfig},
    "backend": {"fsdp2": Fsdp2BackendConfig, "deepspeed_zero3": DeepSpeedBackendConfig},
    "cluster": {"local": LocalClusterConfig, "ray": RayClusterConfig, "slurm": SlurmClusterConfig,
                "ray_job": RayJobClusterConfig, "kubernetes": KubernetesClusterConfig},
    "data": {"data": DataConfig},
    "logger": {"logger": LoggerConfig},
    "checkpoint": {"checkpoint": CheckpointConfig},
}
