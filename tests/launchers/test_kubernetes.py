"""cluster=kubernetes: rendered RayJob manifests validated against KubeRay's real CRD schema
(ray.io_rayjobs.yaml, the ray.io/v1 openAPIV3Schema; see KUBERAY_CRDS in conftest.py), for
several configs, and the pods' preStop hooks run against a real driver.

There is no Kubernetes API server here (nor KubeRay): the schema check is what the API
server with KubeRay installed would apply (its CEL rules aside), and the lifecycle settings
(TTL, deadline, grace period, hooks) are checked in the manifest, not by deleting pods.
`kubectl apply` runs for real against an unreachable server (the error path); the success
path uses a stand-in `kubectl` that records its arguments, in place of the API server."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from launchers import kubernetes
from launchers.common import entry_args
from orchestrator.config.cluster import slurm_time_seconds
from orchestrator.config.compose import compose
from tests.launchers.conftest import KUBERAY_CRDS, TINY, entry

CONFIGS = {
    "cpu_tiny": [*TINY, "cluster=kubernetes"],
    "gpu_lora_2x8": [
        "+experiment=sft_lora",
        "data.source=/data/chat.jsonl",
        "cluster=kubernetes",
        "cluster.nodes=2",
        "cluster.gpus_per_node=8",
        "cluster.num_workers=16",
        "cluster.image=registry.example.com/ml/orchestrator:0.1.0",
        "cluster.namespace=ml-team",
        "cluster.service_account=trainer",
        "+cluster.node_selector.gpu=h100",
        "+cluster.env.HF_HUB_OFFLINE=1",
        "cluster.memory_per_node=900Gi",
        "cluster.cpus_per_node=96",
        "cluster.cpus_per_worker=8",
        "train.global_batch_size=64",
    ],
    "shared_cluster_options": [
        *TINY,
        "cluster=kubernetes",
        "cluster.nodes=2",
        "cluster.gpus_per_node=4",
        "cluster.time=1-12:00:00",
        "cluster.image_pull_secrets=[regcred,mirror-cred]",
        "cluster.priority_class=training-high",
        "cluster.kueue_queue=team-a",
        "cluster.kueue_priority=production",
        "cluster.shm_size=64Gi",
        "cluster.stop_grace_s=600",
        "cluster.ray_version=2.60.0",
        "cluster.ttl_s=0",
    ],
    "no_secret_abs_dir": [
        *TINY,
        "cluster=kubernetes",
        "cluster.wandb_secret=null",
        "cluster.shared_mount=/data",
        "run.output_dir=/data/runs/a",
        "cluster.backoff_limit=0",
        "cluster.image_pull_policy=Always",
        "cluster.head_cpus=500m",
    ],
}


@pytest.fixture(scope="module")
def rayjob_schema():
    path = KUBERAY_CRDS / "ray.io_rayjobs.yaml"
    if not path.is_file():
        pytest.skip(
            f"KubeRay's CRDs are not at {KUBERAY_CRDS}: set KUBERAY_CRDS to a directory with ray.io_rayjobs.yaml "
            "(github.com/ray-project/kuberay, ray-operator/config/crd/bases)"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB: C is 5x faster
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def pruned_fields(doc, schema, path="") -> list:
    """Fields the API server would silently drop: not in the (structural) schema."""
    if isinstance(doc, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if props is None:  # a map (labels, resources, nodeSelector)
            return [] if extra is None else sum((pruned_fields(v, extra, f"{path}.{k}") for k, v in doc.items()), [])
        out = []
        for k, v in doc.items():
            out += [f"{path}.{k}"] if k not in props else pruned_fields(v, props[k], f"{path}.{k}")
        return out
    if isinstance(doc, list) and "items" in schema:
        return sum((pruned_fields(v, schema["items"], f"{path}[{i}]") for i, v in enumerate(doc)), [])
    return []


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rendered_rayjob_matches_the_crd(name, rayjob_schema, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, choices = compose(CONFIGS[name])
    config_map, job = kubernetes.manifests(cfg, choices)

    jsonschema.Draft7Validator(rayjob_schema).validate(job)
    assert pruned_fields(job, rayjob_schema) == []
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    c = cfg.cluster
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == c.nodes
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu", 0) == c.gpus_per_node
    for pod in (workers, job["spec"]["rayClusterSpec"]["headGroupSpec"]):
        spec = pod["template"]["spec"]
        assert spec["containers"][0]["image"] == c.image
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [c.shared_pvc]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert ("WANDB_API_KEY" in env) == (c.wandb_secret is not None)
        if c.wandb_secret:
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == c.wandb_secret

    # The entrypoint finds the resolved config where the ConfigMap is mounted, and that
    # config composes into the same run with cluster=ray and the run dir on the volume.
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["namespace"] == c.namespace
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] == "config")
    item = next(v for v in head["volumes"] if v["name"] == "config")["configMap"]["items"][0]
    local = tmp_path / mount.lstrip("/")
    (local / item["path"]).parent.mkdir(parents=True)
    (local / item["path"]).write_text(config_map["data"][item["key"]])
    args = job["spec"]["entrypoint"].split()
    assert args[:3] == ["python", "-m", "orchestrator"]
    job_cfg, job_choices = compose(entry_args(str(local))[2:])
    assert job_choices["cluster"] == "ray" and job_cfg.cluster.num_workers == c.num_workers
    assert job_cfg.run.output_dir.startswith(c.shared_mount + "/")
    assert job_cfg.method == cfg.method and job_cfg.train == cfg.train
    check_lifecycle(job, c)


def check_lifecycle(job: dict, c) -> None:
    """What decides how long the job holds its GPUs and how it stops (issue: a finished job
    kept the whole cluster for an hour; a stopped pod lost the steps since the checkpoint)."""
    spec = job["spec"]
    assert spec["ttlSecondsAfterFinished"] == c.ttl_s <= 60 and spec["shutdownAfterJobFinishes"] is True
    assert spec.get("activeDeadlineSeconds") == (slurm_time_seconds(c.time) if c.time else None)
    assert spec["rayClusterSpec"]["rayVersion"] == (c.ray_version or importlib.metadata.version("ray"))
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(c.stop_grace_s)
    labels = job["metadata"]["labels"]
    assert labels.get("kueue.x-k8s.io/queue-name") == c.kueue_queue
    assert labels.get("kueue.x-k8s.io/priority-class") == c.kueue_priority
    pods = {
        "head": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
        "worker": spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"],
        "submitter": spec["submitterPodTemplate"]["spec"],
    }
    for role, pod in pods.items():
        assert [s["name"] for s in pod.get("imagePullSecrets", [])] == list(c.image_pull_secrets), role
        assert pod.get("priorityClassName") == c.priority_class, role
        assert pod["containers"][0]["image"] == c.image, role
    assert pods["submitter"]["restartPolicy"] == "Never" and "command" not in pods["submitter"]["containers"][0]
    for role in ("head", "worker"):
        pod = pods[role]
        assert pod["terminationGracePeriodSeconds"] == c.stop_grace_s
        hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:4] == ["python", "-m", "launchers.pod_stop", role]
        assert float(hook[4].split("=")[1]) < c.stop_grace_s  # the hook ends within the grace period
        shm = next(v["emptyDir"] for v in pod["volumes"] if v["name"] == "dshm")
        memory = pod["containers"][0]["resources"]["limits"]["memory"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"] == (c.shm_size or kubernetes.half_quantity(memory))


def test_half_quantity():
    assert [kubernetes.half_quantity(q) for q in ("32Gi", "8Gi", "1000M", "1G", "3Mi")] == [
        "16384Mi",
        "4096Mi",
        "476Mi",
        "476Mi",
        "1Mi",
    ]


@pytest.fixture
def k8s_run(tmp_path, monkeypatch):
    """A relative run dir: in the pod it lands under the shared mount, here under cwd."""
    monkeypatch.chdir(tmp_path)
    return [*TINY, "run.output_dir=runs/tiny", "cluster=kubernetes"], tmp_path / "runs" / "tiny"


def test_render_only_prints_and_saves(k8s_run, capsys):
    overrides, run_dir = k8s_run
    assert entry(*overrides) == 0
    out = capsys.readouterr().out
    manifest = run_dir / "launch" / "rayjob.yaml"
    config_map, job = yaml.safe_load_all(manifest.read_text())
    assert (config_map["kind"], job["kind"]) == ("ConfigMap", "RayJob")
    assert "run:\n  name: sft_tiny\n  output_dir: /mnt/shared/runs/tiny\n" in config_map["data"]["config.yaml"]
    assert "kind: RayJob" in out and f"kubectl apply -f {manifest}" in out


def test_run_dir_off_the_shared_volume(tiny, capsys):
    overrides, run_dir = tiny  # an absolute path that is not under cluster.shared_mount
    assert entry(*overrides, "cluster=kubernetes") == 2
    assert "is not on the shared volume (cluster.shared_mount='/mnt/shared')" in capsys.readouterr().err


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "t", "cluster": {"server": server}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
                "users": [{"name": "t", "user": {"token": "x"}}],
            }
        )
    )
    return path


def test_apply_with_an_unreachable_api_server(k8s_run, tmp_path, capsys, monkeypatch):
    import shutil

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    overrides, _ = k8s_run
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, "https://127.0.0.1:1")))
    assert entry(*overrides, "cluster.apply=true") == 1
    assert "kubectl apply failed:" in capsys.readouterr().err


def test_apply_runs_kubectl(k8s_run, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "kubectl"  # stands in for kubectl + an API server with KubeRay
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "rayjob.ray.io/sft-tiny created"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    overrides, run_dir = k8s_run
    assert entry(*overrides, "cluster.apply=true", "cluster.context=prod", "cluster.namespace=ml") == 0
    assert calls.read_text().split() == ["--context", "prod", "apply", "-f", str(run_dir / "launch" / "rayjob.yaml")]
    out = capsys.readouterr().out
    assert "applied RayJob sft-tiny in namespace ml" in out
    assert "kubectl --context prod -n ml logs -f job/sft-tiny" in out


def test_apply_without_kubectl(k8s_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    overrides, run_dir = k8s_run
    assert entry(*overrides, "cluster.apply=true") == 2
    assert "`kubectl` is not on PATH" in capsys.readouterr().err
    assert not (run_dir / "launch").exists()
