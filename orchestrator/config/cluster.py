"""Typed schemas of the `cluster` group (where a run executes and how it is launched), each
with the checks of its own fields that need nothing but the config. The launchers check
what needs the cluster itself (a partition's GPUs, a reachable address) before submitting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import MISSING, OmegaConf

from orchestrator.config.checks import Choice, positive
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config.schema import Config


class PlacementStrategy(Choice):
    """Ray placement group strategies."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class ImagePullPolicy(Choice):
    Always = "Always"
    IfNotPresent = "IfNotPresent"
    Never = "Never"


@dataclass
class ClusterConfig:
    name: str = MISSING
    num_workers: int = 2
    """Training worker actors (one per GPU, or per CPU slot on CPU)."""
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    """Ray placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD."""
    placement_timeout_s: int = 120
    """How long to wait for the cluster to have room for all workers."""
    dist_timeout_s: int = 600
    """torch.distributed collective timeout."""

    def check(self, cfg: Config) -> None:
        positive(self.num_workers, "cluster.num_workers")
        positive(self.cpus_per_worker, "cluster.cpus_per_worker")
        positive(self.gpus_per_worker, "cluster.gpus_per_worker", allow_zero=True)


@dataclass
class LocalClusterConfig(ClusterConfig):
    name: str = "local"
    num_cpus: int | None = None
    """CPUs for the in-process Ray cluster (None: all)."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.gpus_per_worker > 0:
            import torch

            n = self.num_workers
            if not torch.cuda.is_available():
                raise ConfigError(
                    f"cluster.gpus_per_worker={self.gpus_per_worker} but this machine has no CUDA GPU. "
                    "Use cluster.gpus_per_worker=0 to train on CPU (or debug=cpu), or run on a GPU node."
                )
            if n * self.gpus_per_worker > torch.cuda.device_count():
                raise ConfigError(
                    f"cluster.num_workers={n} x cluster.gpus_per_worker={self.gpus_per_worker} GPUs "
                    f"requested but this machine has {torch.cuda.device_count()}"
                )


@dataclass
class RayClusterConfig(ClusterConfig):
    name: str = "ray"
    address: str = "auto"
    """Address of a running Ray cluster (`auto` finds the one on this node)."""
    connect_timeout_s: float = 30.0
    """How long to wait for the Ray cluster at `address` to answer (it may be starting) before failing."""


# Submitting launchers size the worker group from the allocation by default: one worker
# per GPU (4 nodes x 8 GPUs -> 32 workers of 1 GPU), or one per node on CPU-only nodes.
# Resolvers rather than code in the launcher, so `--cfg job` shows the numbers that run.
OmegaConf.register_new_resolver("alloc_workers", lambda nodes, gpus: nodes * gpus if gpus else nodes, replace=True)
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
    mem: str | None = None
    """Memory per node (`--mem`, e.g. 200G); None: the partition's default; 0: all of it."""
    partition: str | None = None
    """Slurm partition (`--partition`); None: the cluster's default partition."""
    time: str = "01:00:00"
    """Time limit (`--time`): minutes, [D-]HH:MM[:SS] or UNLIMITED."""
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    """Allocate whole nodes (`--exclusive`)."""
    job_name: str | None = None
    """Job name; None: run.name."""
    requeue: bool = True
    """On the signal below or SIGTERM: checkpoint, then requeue the job; it resumes on restart."""
    signal_before_s: int = 300
    """Seconds before the time limit that Slurm sends SIGUSR1 to the batch script (0: none)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options, one per entry (e.g. [--constraint=h100, --reservation=r1])."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in the job script (module load, source a venv, ...); the other
    nodes' Ray workers inherit the environment they set up."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported in the job."""
    python: str | None = None
    """Python on the nodes; None: the interpreter that submits (shared filesystem)."""
    ray_port: int | None = None
    """Ray head (GCS) port; None: one the system picks when the job starts. Ray's other ports
    are always picked that way, so several jobs can share a node."""
    ray_start_timeout_s: int = 300
    """How long the script waits for every node to join the Ray cluster."""
    dry_run: bool = False
    """Render and print the sbatch script (and save it with the config) without submitting."""

    def check(self, cfg: Config) -> None:
        _check_env(self.env)
        _check_allocation(self)
        positive(self.cpus_per_node, "cluster.cpus_per_node", allow_zero=True)
        if self.cpus_per_node and self.num_workers * self.cpus_per_worker > self.nodes * self.cpus_per_node:
            raise ConfigError(
                f"cluster.num_workers={self.num_workers} x cluster.cpus_per_worker={self.cpus_per_worker} "
                f"CPUs do not fit in cluster.nodes={self.nodes} x cluster.cpus_per_node={self.cpus_per_node}"
            )
        limit = slurm_time_seconds(self.time)
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(self.mem)):
            raise ConfigError(f"cluster.mem={self.mem!r} is not a Slurm memory size; use e.g. 64G, 500000M or 0 (all)")
        if not 0 <= self.signal_before_s <= 65535:
            raise ConfigError(f"cluster.signal_before_s={self.signal_before_s} must be in [0, 65535] (sbatch --signal)")
        if self.requeue and limit is not None and self.signal_before_s >= limit:
            raise ConfigError(
                f"cluster.signal_before_s={self.signal_before_s} is not shorter than cluster.time="
                f"{self.time!r} ({limit}s): the job would be signalled before it starts. Lower it or raise "
                "cluster.time."
            )
        if self.ray_port is not None and not 1024 <= self.ray_port <= 65535:
            raise ConfigError(f"cluster.ray_port={self.ray_port} must be in [1024, 65535] (or null: a free port)")
        for arg in self.sbatch_args:
            if not arg.startswith("-"):
                raise ConfigError(f"cluster.sbatch_args entry {arg!r} must be an sbatch option (--name=value)")
        super().check(cfg)


@dataclass
class RayJobClusterConfig(ClusterConfig):
    """Submit the entry to a running Ray cluster through the Ray Jobs API."""

    name: str = "ray_job"
    address: str = "http://127.0.0.1:8265"
    """Ray Jobs API (dashboard) address of the cluster."""
    upload_code: bool = True
    """Upload this checkout's packages with the job (runtime_env py_modules); False: use
    the package installed on the cluster."""
    pip: list[str] = field(default_factory=list)
    """Extra pip requirements installed for the job (runtime_env pip)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the job (runtime_env env_vars)."""
    forward_env: list[str] = field(default_factory=lambda: ["WANDB_API_KEY", "WANDB_MODE", "HF_TOKEN"])
    """Variables copied from the submitting shell into the job when set there."""
    submission_id: str | None = None
    """Job id; None: <run.name>-<time>."""
    entrypoint_num_cpus: float = 0
    """CPUs reserved for the driver process on the cluster."""
    follow: bool = False
    """Stream the job's logs until it ends; a failed job then fails this command."""

    def check(self, cfg: Config) -> None:
        _check_env(self.env)
        if not re.fullmatch(r"(https?://)?[\w.\-]+(:\d+)?/?|auto", self.address):
            raise ConfigError(
                f"cluster.address={self.address!r} is not a Ray Jobs API address; use the dashboard's http://HOST:8265"
            )
        positive(self.entrypoint_num_cpus, "cluster.entrypoint_num_cpus", allow_zero=True)
        super().check(cfg)


@dataclass
class KubernetesClusterConfig(ClusterConfig):
    """Render a KubeRay RayJob (ray.io/v1) running the entry in our image; apply on request."""

    name: str = "kubernetes"
    num_workers: int = "${alloc_workers:${.nodes},${.gpus_per_node}}"  # type: ignore[assignment]
    gpus_per_worker: int = "${alloc_gpus_per_worker:${.gpus_per_node}}"  # type: ignore[assignment]
    image: str = "orchestrator:latest"
    """Image built from docker/Dockerfile (the tag its build command gives); push it to a
    registry the cluster pulls from and name it here."""
    image_pull_policy: ImagePullPolicy = ImagePullPolicy.IfNotPresent
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
    wandb_secret: str | None = "wandb"
    """Secret with key `api_key` exposed as WANDB_API_KEY (optional in the pod); None: none."""
    node_selector: dict[str, str] = field(default_factory=dict)
    service_account: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for every Ray container."""
    backoff_limit: int = 2
    """Times KubeRay retries a failed job; each retry resumes from the latest checkpoint."""
    ttl_s: int = 60
    """Seconds KubeRay keeps the Ray cluster (head and worker pods, their GPUs) after the job
    ends, then deletes it; the RayJob object (its status) and the run dir on the PVC stay."""
    time: str | None = None
    """The run's time limit (Slurm's formats: minutes, HH:MM:SS, D-HH:MM:SS); KubeRay stops
    the job after it (activeDeadlineSeconds), the driver checkpointing first. None: no limit."""
    stop_grace_s: int = 300
    """Seconds a stopping pod has for the driver to checkpoint (terminationGracePeriodSeconds;
    the preStop hooks of launchers/pod_stop.py use them). Also `ray job stop`'s grace."""
    shm_size: str | None = None
    """Size limit of /dev/shm (memory-backed: it counts against the pod's memory limit);
    None: half of the pod's memory."""
    ray_version: str | None = None
    """rayVersion of the RayCluster (KubeRay picks the submitter's commands by it); None: the
    installed Ray's version, which the image pins through constraints.txt."""
    image_pull_secrets: list[str] = field(default_factory=list)
    """Secrets with registry credentials for pulling cluster.image (imagePullSecrets)."""
    priority_class: str | None = None
    """PriorityClass of the pods (priorityClassName), e.g. so that training is not preempted."""
    kueue_queue: str | None = None
    """Kueue LocalQueue to admit the job through (label kueue.x-k8s.io/queue-name)."""
    kueue_priority: str | None = None
    """Kueue WorkloadPriorityClass of the job (label kueue.x-k8s.io/priority-class)."""
    apply: bool = False
    """`kubectl apply` the rendered manifests (else only render and print them)."""
    context: str | None = None
    """kubectl context; None: the current one."""

    def check(self, cfg: Config) -> None:
        _check_env(self.env)
        _check_allocation(self)
        if not self.image or re.search(r"\s", self.image):
            raise ConfigError(f"cluster.image={self.image!r} must name an image, e.g. registry/orchestrator:0.1")
        if not re.fullmatch(_DNS_LABEL, self.namespace):
            raise ConfigError(
                f"cluster.namespace={self.namespace!r} is not a valid Kubernetes namespace "
                "(lowercase letters, digits and '-', at most 63)"
            )
        for key in ("cpus_per_node", "memory_per_node", "head_cpus", "head_memory", "shm_size"):
            if getattr(self, key) is None:
                continue
            if not re.fullmatch(_K8S_QUANTITY, str(getattr(self, key))):
                raise ConfigError(
                    f"cluster.{key}={getattr(self, key)!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)"
                )
        if not self.shared_mount.startswith("/"):
            raise ConfigError(f"cluster.shared_mount={self.shared_mount!r} must be an absolute path")
        out = cfg.run.output_dir
        if out.startswith("/") and not (out + "/").startswith(self.shared_mount.rstrip("/") + "/"):
            raise ConfigError(
                f"run.output_dir={out!r} is not on the shared volume (cluster.shared_mount="
                f"{self.shared_mount!r}): checkpoints there would be lost with the pod. Use a relative "
                "run.output_dir (placed under the mount) or a path below the mount."
            )
        positive(self.backoff_limit, "cluster.backoff_limit", allow_zero=True)
        positive(self.ttl_s, "cluster.ttl_s", allow_zero=True)
        positive(self.stop_grace_s, "cluster.stop_grace_s")
        if self.time is not None:
            slurm_time_seconds(self.time)
        _check_k8s_names(self)
        super().check(cfg)


def _check_k8s_names(c: KubernetesClusterConfig) -> None:
    """Names the API server would reject: secrets, priority class, Kueue labels (DNS-1123)."""
    named = [("image_pull_secrets", s) for s in c.image_pull_secrets]
    named += [(key, getattr(c, key)) for key in ("priority_class", "kueue_queue", "kueue_priority")]
    for key, value in named:
        if value is not None and not re.fullmatch(_DNS_SUBDOMAIN, value):
            raise ConfigError(
                f"cluster.{key}: {value!r} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')"
            )


def _check_env(env: dict[str, str]) -> None:
    for key in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"cluster.env key {key!r} is not a valid environment variable name")


def _check_allocation(c: SlurmClusterConfig | KubernetesClusterConfig) -> None:
    """The workers' GPUs fit in the nodes the job asks for."""
    positive(c.nodes, "cluster.nodes")
    positive(c.gpus_per_node, "cluster.gpus_per_node", allow_zero=True)
    need, have = c.num_workers * c.gpus_per_worker, c.nodes * c.gpus_per_node
    if need > have:
        raise ConfigError(
            f"cluster.num_workers={c.num_workers} x cluster.gpus_per_worker={c.gpus_per_worker} = "
            f"{need} GPU(s) but the job asks for cluster.nodes={c.nodes} x cluster.gpus_per_node="
            f"{c.gpus_per_node} = {have}. Raise cluster.gpus_per_node / cluster.nodes, or lower "
            "cluster.num_workers (cluster.gpus_per_worker=0 trains on CPU)."
        )


# Kubernetes resource.Quantity, as in the CRD schemas (`x-kubernetes-int-or-string` pattern).
_K8S_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # also a valid label value
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (the forms `man sbatch` lists).
_SLURM_TIME = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"
)


def slurm_time_seconds(value: str) -> int | None:
    """Seconds in an sbatch --time value; None for UNLIMITED. ConfigError if malformed."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _SLURM_TIME.match(value)
    if not m:
        raise ConfigError(
            f"cluster.time={value!r} is not a Slurm time limit; use minutes (90), HH:MM:SS "
            "(24:00:00), D-HH[:MM[:SS]] (2-00) or UNLIMITED"
        )
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        return g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    parts = [g[k] for k in ("a", "b", "c") if k in g]  # M | M:S | H:M:S
    return {
        1: lambda: parts[0] * 60,
        2: lambda: parts[0] * 60 + parts[1],
        3: lambda: parts[0] * 3600 + parts[1] * 60 + parts[2],
    }[len(parts)]()
