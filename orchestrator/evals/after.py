"""`run.eval_after=true`: once a training run has exported its model, evaluate it against the
model the run started from, as an eval run of its own in `<run dir>/eval`.

The eval run is the same config with `stage=eval`, the run directory as the candidate, no
base named (so: the model recorded as the run's start) and the run's `eval` group (tasks,
gate, items); it checkpoints after every task and resumes like any run. Its decision and
report paths are added to the training run's summary (and `summary.json`), and its section
(scores with intervals, the gate's decision) to the model card in the run's exports.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.config.schema import EvalStageConfig

log = logging.getLogger("orchestrator")


def eval_config(cfg, run_dir: Path):
    """The eval run's config for the training run `cfg` whose run directory is `run_dir`."""
    return replace(
        cfg,
        stage=EvalStageConfig(),
        eval=replace(cfg.eval, candidate=str(run_dir), base=None),
        run=replace(cfg.run, output_dir=str(run_dir / "eval"), eval_after=False, init_from=None, callbacks=[]),
        # a checkpoint per task (only the scores: frozen roles save nothing), to resume mid-eval
        checkpoint=replace(cfg.checkpoint, dir=None, export_hf=False, every_steps=1),
    )


def evaluate_after(cfg, choices: dict[str, str], summary: dict[str, Any]) -> dict[str, Any]:
    """Run the evaluation of a finished training run; its summary with the eval's entries."""
    from orchestrator.config.validate import validate
    from orchestrator.driver import Driver

    if cfg.stage.name == "eval":
        return summary
    if not summary.get("exports"):
        log.warning("run.eval_after: the run exported no model (checkpoint.export_hf=false); nothing to evaluate")
        return summary
    run_dir = Path(summary["run_dir"])
    ecfg = eval_config(cfg, run_dir)
    validate(ecfg)
    log.info(
        "run.eval_after: evaluating %s against the model the run started from (in %s)", run_dir, ecfg.run.output_dir
    )
    from orchestrator.stages.eval import GateRejected

    report = Path(ecfg.run.output_dir) / "report.json"
    try:
        result = Driver(ecfg, {**choices, "stage": "eval"}).run()
    except GateRejected:
        _add_eval_to_cards(cfg, run_dir, summary["exports"], report)
        raise
    _add_eval_to_cards(cfg, run_dir, summary["exports"], report)
    merged = {**summary, **{k: v for k, v in result.items() if k.startswith("eval_")}}
    (run_dir / "summary.json").write_text(json.dumps(merged, indent=1))
    return merged


def _add_eval_to_cards(cfg, run_dir: Path, exports: dict[str, str], report_path: Path) -> None:
    """The export's model card, rewritten with the eval's section."""
    import yaml

    from orchestrator.evals.card import write_export_cards

    if not report_path.is_file():
        return
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    write_export_cards(cfg, run_dir, recorded, exports, json.loads(report_path.read_text()))
