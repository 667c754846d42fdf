"""The model card a training run writes into its export: base model, the stage chain with its
hyperparameters, the training data with row count and sha256, and, once evaluated, the
eval's section."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.config.compose import compose
from orchestrator.evals.card import write_export_cards


def _run(root: Path, name: str, *overrides: str) -> tuple:
    """A run dir as the driver leaves it (config.yaml, summary.json, export/hf), without weights."""
    run = root / name
    cfg, _ = compose(["+experiment=sft_arith_warmup", f"run.output_dir={run}", *overrides])
    recorded = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    export = run / "export" / "hf"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(recorded))
    (run / "summary.json").write_text(json.dumps({"exports": {"model": str(export)}, "run_dir": str(run)}))
    return cfg, recorded, {"model": str(export)}


def test_the_export_card_names_the_chain_and_the_data_hash(tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i)} for i in range(5)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run(tmp_path, "warmup", "train.max_steps=3")
    cfg, recorded, exports = _run(
        tmp_path,
        "sft",
        f"model.pretrained={tmp_path / 'warmup' / 'export' / 'hf'}",
        f"data.source={data}",
        "train.lr=3e-4",
        "eval.intended_use=arithmetic drills",
    )
    written = write_export_cards(cfg, tmp_path / "sft", recorded, exports)
    card = Path(written[0]).read_text()
    assert written == [str(tmp_path / "sft" / "export" / "hf" / "README.md")]
    sha = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()
    assert f"5 rows, sha256 `{sha}`" in card and str(data) in card
    assert "Not evaluated yet" in card and "arithmetic drills" in card and "Date: 20" in card
    chain = card.split("- stage chain")[1]
    assert "1. stage sft" in chain and "max_steps=3" in chain and "synthetic:arithmetic_noisy" in chain
    assert "2. stage sft" in chain and "lr=0.0003" in chain and "(this run)" in chain
    assert "base model: `tiny_llama built locally (random init)`" in card  # the chain's first start

    report = {
        "decision": "PROMOTE",
        "date": "2026-01-01T00:00:00+00:00",
        "base": {"ref": "start", "weights": "random init"},
        "gate": {"alpha": 0.05, "rules": [{"passed": True, "metric": "qa/nll", "reasons": ["p 0.001 < 0.05"]}]},
        "metrics": [
            {
                "key": "qa/nll",
                "task": "qa",
                "higher_is_better": False,
                "candidate": 1.0,
                "candidate_ci": [0.9, 1.1],
                "base": 2.0,
                "base_ci": [1.9, 2.1],
                "delta": -1.0,
                "delta_ci": [-1.1, -0.9],
                "p_value": 0.001,
                "test": "paired_permutation",
            }
        ],
        "tasks": [],
        "statistics": {"confidence": 0.95},
    }
    write_export_cards(cfg, tmp_path / "sft", recorded, exports, report)
    card = Path(written[0]).read_text()
    assert "Promotion gate: **PROMOTE**" in card and "| qa/nll (lower is better) | 1 [0.9, 1.1]" in card
    assert f"sha256 `{sha}`" in card
