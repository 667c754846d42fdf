"""Workers on a real 2-node Ray cluster (two raylets on this machine): with SPREAD
placement the two ranks land on different nodes, wire gloo across them and train."""

from __future__ import annotations

import json
from statistics import mean

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def test_ranks_on_different_nodes_train_together(run_main):
    rc, run_dir = run_main(
        "+experiment=sft_tiny",
        "cluster.placement_strategy=STRICT_SPREAD",
        "train.max_steps=12",
        "checkpoint.export_hf=false",
        "checkpoint.every_steps=0",
    )
    assert rc == 0
    workers = json.loads((run_dir / "summary.json").read_text())["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["node_id"] != workers[1]["node_id"]
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert mean(losses[-3:]) < mean(losses[:3]) - 0.5


def test_more_workers_than_the_cluster_holds_is_a_clear_error(run_main):
    rc, run_dir = run_main(
        "+experiment=sft_tiny",
        "cluster.num_workers=8",
        "cluster.cpus_per_worker=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=1",
    )
    assert rc == 2
    assert not (run_dir / "metrics.jsonl").exists()
