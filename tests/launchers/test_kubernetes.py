"""cluster=kubernetes: rendered RayJob manifests validated against KubeRay's real CRD schema
(`../shared/k8s/ray.io_rayjobs.yaml`, ray.io/v1 openAPIV3Schema), for several configs.

There is no Kubernetes API server here: the schema check is what the API server with
KubeRay installed would apply (its CEL rules aside). `kubectl apply` runs for real against
an unreachable server (the error path); the success path uses a stand-in `kubectl` that
records its arguments, in place of the API server this machine cannot run."""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from launchers import kubernetes
from launchers.common import entry_args
from orchestrator.config.compose import compose
from tests.launchers.conftest import SHARED_K8S, TINY, entry

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
    path = SHARED_K8S / "ray.io_rayjobs.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SHARED_K8S} (the shared/ directory beside the repo)")
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
