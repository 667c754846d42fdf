"""Decontamination check: evaluation items found in the candidate's training data are flagged
by index with their overlap, and eval.on_contamination=stop stops with one error naming them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.evals.contamination import ContaminationError, check_tasks, markdown_lines, tokens
from orchestrator.evals.report import markdown
from orchestrator.models import build_model, build_tokenizer
from orchestrator.stages import STAGES

LONG = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May"


def _conv(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def contaminated_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished SFT run whose training file holds two of the eval file's items."""
    root = tmp_path_factory.mktemp("contaminated")
    train = [_conv(f"What is {i} plus {i}?", str(2 * i)) for i in range(40)]
    train.append(_conv(f"Story: {LONG}. How many clips?", "72"))
    _write(root / "train.jsonl", train)
    evals = [
        _conv("What is 7 plus 7?", "14"),  # in training, short: matched whole
        _conv("What is 1000 plus 1?", "1001"),
        _conv(LONG + " altogether?", "72"),  # 13-grams of a training row
        _conv("Name a colour of the sky on a clear summer day at noon in the mountains", "blue"),
    ]
    _write(root / "eval.jsonl", evals)
    run = root / "run"
    cfg, _ = compose(["+experiment=sft_arith_warmup", f"data.source={root / 'train.jsonl'}", f"run.output_dir={run}"])
    run.mkdir()
    (run / "config.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    )
    export = run / "export" / "hf"
    build_model(cfg.model, torch.float32).save_pretrained(export)
    build_tokenizer(cfg.model).save_pretrained(export)
    (run / "summary.json").write_text(json.dumps({"exports": {"model": str(export)}, "run_dir": str(run)}))
    return run, root / "eval.jsonl"


def _stage(run: Path, eval_file: Path, tmp_path: Path, *overrides: str):
    cfg, _ = compose(
        [
            "stage=eval",
            f"eval.candidate={run}",
            f"run.output_dir={tmp_path / 'eval'}",
            f"eval.tasks=[{{kind:nll,name:qa,source:{eval_file}}}]",
            *overrides,
        ]
    )
    validate(cfg)
    return STAGES["eval"](cfg, build_tokenizer(cfg.model))


def test_items_of_the_training_file_are_flagged_in_the_report(contaminated_run, tmp_path):
    run, eval_file = contaminated_run
    stage = _stage(run, eval_file, tmp_path)  # warn (the default): flagged, the eval goes on
    c = stage.contamination
    assert c["checked"] and c["training_rows"] == 41 and c["training_source"].endswith("train.jsonl")
    task = c["tasks"]["qa"]
    assert [(f["index"], f["match"]) for f in task["flagged_items"]] == [(0, "whole"), (2, "ngram")]
    assert task["flagged_items"][0]["fraction"] == 1.0 and 0.5 <= task["flagged_items"][2 - 1]["fraction"] < 1.0
    assert task["flagged"] == 2 and task["fraction_flagged"] == 0.5
    lines = "\n".join(markdown_lines(c))
    assert "| qa | 4 | 2 (50.0%) | 0: 100%" in lines and "train.jsonl" in lines
    report = {
        "decision": "REJECT",
        "date": "d",
        "candidate": {"ref": "c", "weights": "c"},
        "base": {"ref": "b", "weights": "b"},
        "gate": {"alpha": 0.05, "rules": []},
        "metrics": [],
        "tasks": [],
        "statistics": {"confidence": 0.95, "bootstrap_resamples": 1, "intervals": "x"},
        "contamination": c,
    }
    assert "## Contamination" in markdown(report)


def test_on_contamination_stop_names_the_items_and_the_training_source(contaminated_run, tmp_path):
    run, eval_file = contaminated_run
    with pytest.raises(ContaminationError, match=r"train\.jsonl.*qa: items 0 \(100%\), 2 \(") as exc:
        _stage(run, eval_file, tmp_path, "eval.on_contamination=stop")
    assert exc.value.exit_code != 0
    skipped = _stage(run, eval_file, tmp_path, "eval.on_contamination=skip").contamination
    assert skipped["checked"] is False


def test_overlap_is_measured_on_normalised_text():
    assert tokens("What IS 12+5?") == ["what", "is", "12", "+", "5", "?"]
    task = SimpleNamespace(name="t", items=[{"text": "what is 12 - 5 ?"}, {"text": "WHAT is 12+5?"}])
    res = check_tasks([task], [{"text": "Q: What is 12 + 5? A: 17"}], n=13, threshold=0.5)
    assert [f.index for f in res[0].flagged] == [1]  # 12 - 5 is not 12 + 5
    long = " ".join(f"w{i}" for i in range(30))
    half = SimpleNamespace(name="h", items=[{"text": long}])
    rows = [{"text": " ".join(f"w{i}" for i in range(15))}]  # 3 of the item's 18 13-grams
    assert check_tasks([half], rows, n=13, threshold=0.5)[0].flagged == []
    assert check_tasks([half], rows, n=13, threshold=0.1)[0].flagged[0].fraction == pytest.approx(3 / 18, abs=1e-3)


def test_contamination_settings_are_checked(tmp_path):
    for override, message in (
        ("eval.contamination_threshold=0", "eval.contamination_threshold=0"),
        ("eval.contamination_ngram=0", "eval.contamination_ngram=0"),
    ):
        cfg, _ = compose(["stage=eval", override, f"run.output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
