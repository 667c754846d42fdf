"""cluster=kubernetes: render a KubeRay RayJob (ray.io/v1) that runs the entry in our image.

Rendered into `<run.output_dir>/launch/rayjob.yaml` here (two documents), printed, and
applied with `kubectl apply` when cluster.apply=true:

  ConfigMap <name>-config   the resolved config (launchers/common.py), mounted on the head
                            at /etc/orchestrator/resolved/config.yaml;
  RayJob <name>             a head pod that runs only the driver (num-cpus 0) and a worker
                            group of cluster.nodes pods with cluster.gpus_per_node GPUs each;
                            every pod mounts the shared PVC (run dirs: checkpoints, exports)
                            and /dev/shm, and gets WANDB_API_KEY from the cluster.wandb_secret
                            Secret when that exists. The entrypoint:
      python -m orchestrator 'hydra.searchpath=[file:///etc/orchestrator]' +resolved=config

A relative run.output_dir is placed under the shared mount, so a retried job (KubeRay's
backoffLimit, e.g. after a node was preempted) or the same RayJob applied again after
`kubectl delete rayjob <name>` resumes from the latest checkpoint there.
"""

from __future__ import annotations

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
from orchestrator.errors import OrchestratorError

CONFIG_ROOT = "/etc/orchestrator"
UID = 1000  # the image's non-root user (docker/Dockerfile); fsGroup makes the PVC writable


def _container(cfg, name: str, cpus: str, memory: str, gpus: int, mounts: list[dict]) -> dict:
    c = cfg.cluster
    env = [{"name": k, "value": str(v)} for k, v in c.env.items()]
    if c.wandb_secret:
        env.append(
            {
                "name": "WANDB_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": c.wandb_secret, "key": "api_key", "optional": True}},
            }
        )
    limits = {"cpu": cpus, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {
        "name": name,
        "image": c.image,
        "imagePullPolicy": str(c.image_pull_policy),
        "env": env,
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts,
    }


def _pod(cfg, container: dict, volumes: list[dict], gpus: bool) -> dict:
    c = cfg.cluster
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID},
    }
    if c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    if c.service_account:
        spec["serviceAccountName"] = c.service_account
    if gpus:  # GPU node pools are commonly tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def manifests(cfg, choices: dict[str, str]) -> list[dict[str, Any]]:
    c = cfg.cluster
    name = job_name(cfg)
    labels = {"app.kubernetes.io/name": "orchestrator", "orchestrator/run": name}
    meta = {"name": name, "namespace": c.namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{name}-config"},
        "data": {"config.yaml": overlay_yaml(cfg, choices, base=c.shared_mount)},
    }
    shared = [{"name": "shared", "mountPath": c.shared_mount}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": c.shared_pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    head_volumes = volumes + [
        {
            "name": "config",
            "configMap": {
                "name": f"{name}-config",
                "items": [{"key": "config.yaml", "path": f"{RESOLVED_GROUP}/config.yaml"}],
            },
        }
    ]
    head = _container(
        cfg,
        "ray-head",
        c.head_cpus,
        c.head_memory,
        0,
        shared + [{"name": "config", "mountPath": CONFIG_ROOT, "readOnly": True}],
    )
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    worker = _container(cfg, "ray-worker", c.cpus_per_node, c.memory_per_node, c.gpus_per_node, shared)
    ray_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            "entrypoint": "python " + shell_join(entry_args(CONFIG_ROOT)),
            # The driver gets SIGTERM on stop/delete; give it time to checkpoint.
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": c.ttl_s,
            "backoffLimit": c.backoff_limit,
            "rayClusterSpec": {
                "headGroupSpec": {
                    # num-cpus 0: training actors never land on the driver's pod.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(cfg, head, head_volumes, gpus=False),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-workers" if c.gpus_per_node else "workers",
                        "replicas": c.nodes,
                        "minReplicas": c.nodes,
                        "maxReplicas": c.nodes,
                        "rayStartParams": {},
                        "template": _pod(cfg, worker, volumes, gpus=bool(c.gpus_per_node)),
                    }
                ],
            },
        },
    }
    return [config_map, ray_job]


def submit(cfg, choices: dict[str, str]) -> dict[str, Any]:
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
