"""Stage chaining: `run.init_from` starts a run from another run's exported model.

`run.init_from=experiment:NAME` runs that experiment first (in `<run dir>/init_from_NAME`,
so it resumes or is reused like any run), then points `model.pretrained` and
`model.tokenizer` at its `export/hf`. A directory is used as is: a run directory (its
`export/hf`) or a model directory. This is how `sft -> grpo` pipelines are written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict

from orchestrator.errors import ConfigError

log = logging.getLogger("orchestrator")


def resolve_init_from(cfg, choices: Dict[str, str], launch: Callable) -> object:
    src = cfg.run.init_from
    if not src:
        return cfg
    if src.startswith("experiment:"):
        model_dir = _run_chained(cfg, choices, src.split(":", 1)[1], launch)
    else:
        path = Path(src).expanduser()
        model_dir = path / "export" / "hf" if (path / "export" / "hf").is_dir() else path
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"run.init_from={src!r}: no model there (expected a run directory with "
                              "export/hf, or a model directory with config.json)")
    log.info("initialising from %s", model_dir)
    model = replace(cfg.model, pretrained=str(model_dir), tokenizer=str(model_dir))
    return replace(cfg, model=model, run=replace(cfg.run, init_from=None))


def _run_chained(cfg, choices: Dict[str, str], name: str, launch: Callable) -> Path:
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate

    out = Path(cfg.run.output_dir) / f"init_from_{name}"
    summary = out / "summary.json"
    if summary.is_file():
        exports = json.loads(summary.read_text()).get("exports", {})
        if "model" in exports and Path(exports["model"]).is_dir():
            log.info("chained run %s already complete: reusing %s", name, exports["model"])
            return Path(exports["model"])
    overrides = [f"+experiment={name}", f"run.output_dir={out}", f"logger={choices.get('logger', 'wandb')}"]
    sub, sub_choices = compose(overrides)
    sub = replace(sub, cluster=cfg.cluster)  # the chained run uses the same cluster as this one
    if sub.method.name != "full":
        raise ConfigError(f"run.init_from=experiment:{name} must be a method=full run (its export is the "
                          "next stage's base model)")
    validate(sub)
    log.info("running chained stage %s first (in %s)", name, out)
    result = launch(sub, sub_choices)
    return Path(result["exports"]["model"])
