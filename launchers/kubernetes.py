"""cluster=kubernetes: render a KubeRay RayJob (ray.io/v1) that runs the entry in our image.

Rendered into `<run.output_dir>/launch/rayjob.yaml` here (two documents), printed, and
applied with `kubectl apply` when cluster.apply=true:

  ConfigMap <name>-config   the resolved config (launchers/common.py), mounted on the head
                            at /etc/orchestrator/resolved/config.yaml;
  RayJob <name>             a head pod that runs only the driver (num-cpus 0) and a worker
                            group of cluster.nodes pods with cluster.gpus_per_node GPUs each;
                            every pod mounts the shared PVC (run dirs: checkpoints, exports)
                            and a size-limited /dev/shm, and gets WANDB_API_KEY from the
                            cluster.wandb_secret Secret when that exists. The entrypoint:
      python -m orchestrator 'hydra.searchpath=[file:///etc/orchestrator]' +resolved=config

Lifecycle: KubeRay deletes the Ray cluster cluster.ttl_s after the job ends (the RayJob and
the run dir stay); cluster.time sets the job's deadline (activeDeadlineSeconds). A stopping
pod (RayJob deleted, deadline, Kueue preemption, node drain) runs its preStop hook first
(launchers/pod_stop.py): the head's signals the driver, which checkpoints after the current
step, and the workers' wait for that, within cluster.stop_grace_s. A relative run.output_dir
is placed under the shared mount, so a retried job (cluster.backoff_limit) or the same
RayJob applied again resumes from the latest checkpoint there. Options for shared clusters:
cluster.image_pull_secrets, cluster.priority_class, cluster.kueue_queue / kueue_priority.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from launchers.common import (
    RESOLVED_GROUP,
    allocation_note,
    dump_yaml,
    entry_args,
    job_name,
    overlay_yaml,
    require_tool,
    shell_join,
)
from orchestrator.config.cluster import slurm_time_seconds
from orchestrator.errors import OrchestratorError

CONFIG_ROOT = "/etc/orchestrator"
UID = 1000  # the image's non-root user (docker/Dockerfile); fsGroup makes the PVC writable
HOOK_MARGIN_S = 10  # of the grace period, left to Ray's own shutdown after a preStop hook
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def half_quantity(quantity: str) -> str:
    """Half of a memory quantity, in Mi (the default /dev/shm limit: half the pod's memory)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?)?", quantity)
    if not m or (m.group(2) or "") not in _UNITS:
        return quantity  # an unusual but valid quantity (e.g. 1e9): no smaller limit than the pod's
    return f"{max(1, math.floor(float(m.group(1)) * _UNITS[m.group(2) or ''] / 2 / 2**20))}Mi"


def _container(cfg, name: str, resources: tuple[str, str, int], mounts: list[dict], role: str) -> dict:
    c = cfg.cluster
    cpus, memory, gpus = resources
    env = [{"name": k, "value": str(v)} for k, v in c.env.items()]
    if c.wandb_secret:
        env.append(
            {
                "name": "WANDB_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": c.wandb_secret, "key": "api_key", "optional": True}},
            }
        )
    limits = {"cpu": cpus, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    hook = ["python", "-m", "launchers.pod_stop", role, f"--timeout={max(1, c.stop_grace_s - HOOK_MARGIN_S)}"]
    return {
        "name": name,
        "image": c.image,
        "imagePullPolicy": str(c.image_pull_policy),
        "env": env,
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts,
        "lifecycle": {"preStop": {"exec": {"command": hook}}},
    }


def _pod_spec(cfg, containers: list[dict], volumes: list[dict], gpus: bool) -> dict:
    c = cfg.cluster
    spec: dict[str, Any] = {
        "containers": containers,
        "volumes": volumes,
        "securityContext": {"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID},
    }
    if c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    if c.service_account:
        spec["serviceAccountName"] = c.service_account
    if c.priority_class:
        spec["priorityClassName"] = c.priority_class
    if c.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in c.image_pull_secrets]
    if gpus:  # GPU node pools are commonly tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def _ray_pod(cfg, container: dict, volumes: list[dict], gpus: bool) -> dict:
    spec = _pod_spec(cfg, [container], volumes, gpus)
    spec["terminationGracePeriodSeconds"] = cfg.cluster.stop_grace_s
    return {"spec": spec}


def _submitter(cfg) -> dict:
    """KubeRay's default submitter pod (its resources; KubeRay fills in the command), with the
    pull secrets and priority class of the other pods."""
    c = cfg.cluster
    container = {
        "name": "ray-job-submitter",
        "image": c.image,
        "imagePullPolicy": str(c.image_pull_policy),
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    spec = _pod_spec(cfg, [container], [], gpus=False)
    del spec["volumes"]
    spec["restartPolicy"] = "Never"
    return {"spec": spec}


def _volumes(cfg, name: str, memory: str) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of a pod: the shared PVC and /dev/shm, limited to half of `memory`."""
    c = cfg.cluster
    shm = {"medium": "Memory", "sizeLimit": c.shm_size or half_quantity(memory)}
    volumes = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": c.shared_pvc}},
        {"name": "dshm", "emptyDir": shm},
    ]
    return volumes, [{"name": "shared", "mountPath": c.shared_mount}, {"name": "dshm", "mountPath": "/dev/shm"}]


def _head_group(cfg, name: str) -> dict:
    c = cfg.cluster
    volumes, mounts = _volumes(cfg, name, c.head_memory)
    volumes.append(
        {
            "name": "config",
            "configMap": {
                "name": f"{name}-config",
                "items": [{"key": "config.yaml", "path": f"{RESOLVED_GROUP}/config.yaml"}],
            },
        }
    )
    mounts.append({"name": "config", "mountPath": CONFIG_ROOT, "readOnly": True})
    head = _container(cfg, "ray-head", (c.head_cpus, c.head_memory, 0), mounts, "head")
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    # num-cpus 0: training actors never land on the driver's pod.
    return {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _ray_pod(cfg, head, volumes, gpus=False),
    }


def _worker_group(cfg, name: str) -> dict:
    c = cfg.cluster
    volumes, mounts = _volumes(cfg, name, c.memory_per_node)
    worker = _container(cfg, "ray-worker", (c.cpus_per_node, c.memory_per_node, c.gpus_per_node), mounts, "worker")
    return {
        "groupName": "gpu-workers" if c.gpus_per_node else "workers",
        "replicas": c.nodes,
        "minReplicas": c.nodes,
        "maxReplicas": c.nodes,
        "rayStartParams": {},
        "template": _ray_pod(cfg, worker, volumes, gpus=bool(c.gpus_per_node)),
    }


def _labels(cfg, name: str) -> dict[str, str]:
    c = cfg.cluster
    labels = {"app.kubernetes.io/name": "orchestrator", "orchestrator/run": name}
    if c.kueue_queue:
        labels["kueue.x-k8s.io/queue-name"] = c.kueue_queue
    if c.kueue_priority:
        labels["kueue.x-k8s.io/priority-class"] = c.kueue_priority
    return labels


def manifests(cfg, choices: dict[str, str]) -> list[dict[str, Any]]:
    c = cfg.cluster
    name = job_name(cfg)
    meta = {"name": name, "namespace": c.namespace, "labels": _labels(cfg, name)}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **meta,
            "name": f"{name}-config",
            "labels": {k: v for k, v in meta["labels"].items() if "kueue" not in k},
        },
        "data": {"config.yaml": overlay_yaml(cfg, choices, base=c.shared_mount)},
    }
    spec: dict[str, Any] = {
        "entrypoint": "python " + shell_join(entry_args(CONFIG_ROOT)),
        # `ray job stop` (and a deleted RayJob) SIGTERMs the driver: time to checkpoint.
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(c.stop_grace_s)}}),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": c.ttl_s,
        "backoffLimit": c.backoff_limit,
        "submitterPodTemplate": _submitter(cfg),
        "rayClusterSpec": {
            "rayVersion": c.ray_version or importlib.metadata.version("ray"),
            "headGroupSpec": _head_group(cfg, name),
            "workerGroupSpecs": [_worker_group(cfg, name)],
        },
    }
    deadline = slurm_time_seconds(c.time) if c.time else None
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return [config_map, {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec}]


def submit(cfg, choices: dict[str, str]) -> dict[str, Any]:
    from orchestrator.plan import preflight  # on use: the plan imports torch and transformers

    preflight(cfg)  # before rendering: plan.auto may change the micro-batch
    c = cfg.cluster
    kubectl = (
        require_tool("kubectl", "apply the RayJob (or leave cluster.apply=false to only render it)")
        if c.apply
        else None
    )
    docs = manifests(cfg, choices)
    # Saved here beside where the run would be: run.output_dir when relative (in the pod it
    # is under the shared mount), else outputs/<name>, as the pod's path may not exist here.
    run_dir = Path(cfg.run.output_dir)
    path = (Path("outputs", job_name(cfg)) if run_dir.is_absolute() else run_dir).resolve() / "launch" / "rayjob.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(docs, many=True)
    path.write_text(text)
    name, ns = docs[1]["metadata"]["name"], c.namespace
    if allocation_note(c):
        print(allocation_note(c))
    ctx = ["--context", c.context] if c.context else []
    k = "kubectl " + shell_join(ctx + ["-n", ns]) + " "
    if not c.apply:
        print(text)
        print(f"# rendered, not applied: {path}\n# apply with: kubectl apply -f {path}  (or cluster.apply=true)")
        return {"manifest": str(path), "name": name, "applied": False}
    applied = subprocess.run([kubectl, *ctx, "apply", "-f", str(path)], capture_output=True, text=True)
    if applied.returncode != 0:
        raise OrchestratorError(
            f"kubectl apply failed: {applied.stderr.strip() or applied.stdout.strip()}\n(manifest: {path})"
        )
    print(applied.stdout.strip())
    print(
        f"applied RayJob {name} in namespace {ns} (image {c.image})\n"
        f"  status:  {k}get rayjob {name}\n"
        f"  follow:  {k}logs -f job/{name}   (the submitter pod streams the driver's log)\n"
        f"  stop:    {k}delete rayjob {name}   (run dir on PVC {c.shared_pvc} is kept)\n"
        f"  run dir: {yaml.safe_load(docs[0]['data']['config.yaml'])['run']['output_dir']} on the PVC\n"
        f"  manifest: {path}"
    )
    return {"manifest": str(path), "name": name, "applied": True}
