"""Evaluation and promotion end to end on the real entry: a briefly trained candidate against
its random start is promoted (run.eval_after), a candidate against itself is rejected (stage=eval,
with lm-evaluation-harness tasks answered by the same workers), and the report and model card
land in the eval's own run dir, never in the candidate's (the training run's own card in its
export gets the eval's section)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _tree_hash(root: Path, skip: str) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == skip:
            continue
        h.update(str(rel).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_trained_candidate_is_promoted_and_itself_is_rejected(run_main, tmp_path):
    rc, run = run_main(
        "+experiment=sft_arith_warmup",
        "train.max_steps=30",
        "checkpoint.every_steps=0",
        "run.eval_after=true",
        "eval.samples=40",
        "rollout.max_new_tokens=6",
        name="sft",
    )
    assert rc == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["decision"] == "PROMOTE"
    nll = next(m for m in report["metrics"] if m["key"] == "nll_heldout/nll")
    assert nll["candidate"] < nll["base"] and nll["p_value"] < 0.01  # trained vs its random start
    assert {m["key"] for m in report["metrics"]} == {"nll_heldout/nll", "generation_heldout/accuracy"}
    assert "random init" in report["base"]["weights"]
    assert (run / "eval" / "README.md").read_text().startswith("# Model card")
    card = (run / "export" / "hf" / "README.md").read_text()  # the export's card, with the eval's section
    assert "synthetic:arithmetic_noisy" in card and "sha256 `" in card and "Promotion gate: **PROMOTE**" in card
    assert (run / "eval" / "promoted").resolve() == (run / "export" / "hf").resolve()
    assert json.loads((run / "summary.json").read_text())["eval_decision"] == "PROMOTE"

    before = _tree_hash(run, skip="eval")
    rc, ev = run_main(
        "stage=eval",
        f"eval.candidate={run}",
        f"eval.base={run}",
        "eval.tasks=[{kind:nll,items:40},{kind:lm_eval,task:arith_choice,items:12},{kind:lm_eval,task:arith_exact,items:6}]",
        "eval.fail_on_reject=true",
        name="self_eval",
    )
    assert rc == 3  # REJECT with eval.fail_on_reject
    report = json.loads((ev / "report.json").read_text())
    assert report["decision"] == "REJECT" and report["metrics"][0]["delta"] == 0.0
    harness = {m["key"]: m for m in report["metrics"] if m["key"].startswith("arith_")}
    assert set(harness) == {"arith_choice/acc", "arith_choice/acc_norm", "arith_exact/exact_match"}
    assert all(m["delta"] == 0.0 and m["items"] in (12, 6) for m in harness.values())  # one model, both roles
    assert (ev / "README.md").is_file() and (ev / "report.md").is_file() and not (ev / "promoted").exists()
    assert _tree_hash(run, skip="eval") == before  # the candidate's run is untouched
