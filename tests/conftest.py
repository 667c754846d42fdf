"""Shared fixtures: one real 2-node Ray cluster for the whole session (started once),
and a helper that runs the real entry (`orchestrator.__main__.main`) in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The session's in-process cluster (ray.cluster_utils) runs without token auth; every test
# of an external `ray start --head` cluster (tests/launchers) removes this and runs with auth on.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes on this machine (a head and a worker node), 2 logical CPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_main(ray_cluster, tmp_path):
    """Run `python -m orchestrator` in-process on the session cluster; returns (rc, run_dir)."""
    from orchestrator.__main__ import main

    def _run(*overrides: str, name: str = "run"):
        run_dir = tmp_path / name
        default_logger = [] if any(o.startswith("logger=") for o in overrides) else ["logger=console"]
        # the GPU recipes evaluate after training (run.eval_after): only the evaluation tests ask for it
        no_eval = [] if any(o.startswith("run.eval_after=") for o in overrides) else ["run.eval_after=false"]
        rc = main([*default_logger, *no_eval, f"run.output_dir={run_dir}", *overrides])
        return rc, run_dir

    return _run


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
