"""Adding a stage and a method takes a class, a registry line and a config file each
(docs/extending.md): a toy of each, registered from tests/ without touching the package,
trains end to end through the real entry on real Ray workers."""

from __future__ import annotations

import json
import shutil

import cloudpickle
import pytest
import torch
from transformers import AutoModelForCausalLM

import tests.toy_extension as toy
from tests.conftest import REPO, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    from orchestrator.config import schema
    from orchestrator.config.compose import register_schemas
    from orchestrator.methods import METHODS
    from orchestrator.stages import STAGES

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "stage" / "toy_sft.yaml").write_text(toy.STAGE_YAML)
    (conf / "method" / "norms.yaml").write_text(toy.METHOD_YAML)
    monkeypatch.setenv("ORCHESTRATOR_CONF", str(conf))
    monkeypatch.setitem(STAGES, "toy_sft", toy.ToySftStage)
    monkeypatch.setitem(METHODS, "norms", toy.Norms)
    monkeypatch.setitem(schema.GROUP_SCHEMAS["stage"], "toy_sft", toy.ToySftStageConfig)
    monkeypatch.setitem(schema.GROUP_SCHEMAS["method"], "norms", toy.NormsMethodConfig)
    register_schemas()
    # The workers receive the toy classes with the role spec; they are not importable there.
    cloudpickle.register_pickle_by_value(toy)
    yield
    cloudpickle.unregister_pickle_by_value(toy)


def test_toy_stage_and_method_train_end_to_end(toy_registered, run_main):
    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_model

    rc, run_dir = run_main(
        "+experiment=sft_tiny",
        "stage=toy_sft",
        "stage.smoothing=0.2",
        "method=norms",
        "train.max_steps=4",
        "train.lr=1e-2",
        "checkpoint.every_steps=0",
    )
    assert rc == 0
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    exported = AutoModelForCausalLM.from_pretrained(
        json.loads((run_dir / "summary.json").read_text())["exports"]["model"]
    ).state_dict()
    init = build_model(ModelConfig(name="tiny_llama"), torch.float32).state_dict()
    changed = {k for k in init if not torch.equal(exported[k], init[k])}
    assert changed and all("norm" in k for k in changed)  # only what the toy method trains moved
    log = (run_dir / "train.log").read_text()
    assert "method norms" in log
