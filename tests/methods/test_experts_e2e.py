"""`+experiment=moe_experts debug=cpu` end to end through the real entry on the session's
Ray cluster (2 workers over gloo, FSDP2 and ZeRO-3): experts chosen from router statistics, only
their slices change, the delta rebuilds the export, and a resumed run repeats the losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.methods.experts.delta import apply_to_dir
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

BASE = [
    "+experiment=moe_experts",
    "debug=cpu",
    "model=tiny_moe",
    "model.num_layers=2",
    "train.max_steps=4",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "data.num_samples=200",
    "method.threshold=0.3",
    "method.stats_tokens=4096",
    "checkpoint.every_steps=2",
]


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed_zero3"])
def test_moe_experts_recipe_trains_only_the_selected_experts_exports_and_resumes(run_main, backend):
    rc, ref = run_main(*BASE, f"backend={backend}", name="ref")
    assert rc == 0
    record = json.loads((ref / "experts_selection.json").read_text())
    assert record["source"] == "router" and record["stats_tokens"] == 4096
    chosen = {int(k): v for k, v in record["experts"].items()}
    assert sorted(chosen) == [0, 1] and all(chosen.values())
    assert (ref / "experts_selection.png").exists()
    assert "method=experts:" in (ref / "train.log").read_text()  # the recipe's callback logged the table

    exports = json.loads((ref / "summary.json").read_text())["exports"]
    base = AutoModelForCausalLM.from_pretrained(exports["base"]).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(exports["model"]).state_dict()
    for name, before in base.items():
        after = trained[name]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = int(name.split("layers.")[1].split(".")[0])
            changed = [e for e in range(before.shape[0]) if not torch.equal(before[e], after[e])]
            assert changed == chosen[layer], name
        else:
            assert torch.equal(before, after), name  # router, attention, norms, embeddings

    rebuilt = apply_to_dir(exports["base"], Path(exports["delta"]), ref / "rebuilt")
    again = AutoModelForCausalLM.from_pretrained(rebuilt).state_dict()
    assert all(torch.equal(again[k], trained[k]) for k in trained)

    # Resume from the step-2 checkpoint in a fresh run dir (no selection file there: it is
    # measured again, and the checkpoint carries the indices): steps 3-4 repeat exactly.
    resumed = ref.parent / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    rc, resumed = run_main(
        *BASE, f"backend={backend}", "checkpoint.resume=must", "checkpoint.export_hf=false", name="resumed"
    )
    assert rc == 0
    a = {m["step"]: m["loss"] for m in read_metrics(ref)}
    b = {m["step"]: m["loss"] for m in read_metrics(resumed)}
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in b), (a, b)
    assert json.loads((resumed / "experts_selection.json").read_text())["experts"] == record["experts"]
