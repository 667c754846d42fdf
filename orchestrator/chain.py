"""Stage chaining: `run.init_from` starts a run from another run's exported model, and
`stage.reward_model.path=experiment:NAME` scores an RL run with another run's reward model.

`run.init_from=experiment:NAME` runs that experiment first (in `<run dir>/init_from_NAME`,
so it resumes or is reused like any run), then points `model.pretrained` and
`model.tokenizer` at its exported model. The chained experiment may itself chain
(`sft -> dpo -> grpo`: each resolves its own `init_from` first) and may use any method:
a LoRA stage exports its adapter merged into the base for the next stage. Under `debug`,
a chained recipe that needs GPUs is shrunk the same way; one that already runs on CPU
(e.g. `sft_arith_warmup`) runs as written. A directory is used as is: a run directory
(its exported model) or a model directory.

Launchers that run the driver in this process call `resolve_init_from` before it starts;
submitting launchers leave it to the job, which resolves it where it runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional

from orchestrator.errors import ConfigError

log = logging.getLogger("orchestrator")
MODEL_EXPORTS = ("model", "merged")
"""Export kinds that are a whole model, in order of preference."""
_COMPLETED: Optional[dict[tuple[str, Optional[str]], Path]] = None
"""While a chain resolves: its chained runs completed so far, by (experiment, debug overlay),
so that a chain needing one twice (a policy and its reward model from the same warm-up)
runs it once."""


def resolve_init_from(cfg, choices: dict[str, str], launch: Callable) -> object:
    global _COMPLETED
    outermost = _COMPLETED is None
    if outermost:
        _COMPLETED = {}
    try:
        cfg = _resolve_init_from(cfg, choices, launch)
        return _resolve_reward_model(cfg, choices, launch)
    finally:
        if outermost:
            _COMPLETED = None


def _resolve_init_from(cfg, choices: dict[str, str], launch: Callable) -> object:
    src = cfg.run.init_from
    if not src:
        return cfg
    if src.startswith("experiment:"):
        model_dir = _run_chained(cfg, choices, src.split(":", 1)[1], launch)
    else:
        model_dir = _model_dir(Path(src).expanduser())
        if model_dir is None:
            raise ConfigError(
                f"run.init_from={src!r}: no model there (expected a run directory with an "
                "exported model, or a model directory with config.json)"
            )
    log.info("initialising from %s", model_dir)
    model = replace(cfg.model, pretrained=str(model_dir), tokenizer=str(model_dir))
    return replace(cfg, model=model, run=replace(cfg.run, init_from=None))


def _resolve_reward_model(cfg, choices: dict[str, str], launch: Callable) -> object:
    """`stage.reward_model.path=experiment:NAME` (RL stages): run that reward-model recipe
    first, in `<run dir>/reward_model_NAME`, and point the path at its export."""
    spec = getattr(cfg.stage, "reward_model", None)
    if spec is None or not spec.path or not spec.path.startswith("experiment:"):
        return cfg
    model_dir = _run_chained(cfg, choices, spec.path.split(":", 1)[1], launch, prefix="reward_model")
    log.info("reward model: %s", model_dir)
    stage = replace(cfg.stage, reward_model=replace(spec, path=str(model_dir)))
    return replace(cfg, stage=stage)


def _model_dir(path: Path) -> Optional[Path]:
    """The whole model a path names: a model directory, or a run directory's export."""
    if (path / "config.json").is_file():
        return path
    summary = path / "summary.json"
    if summary.is_file():
        exports = json.loads(summary.read_text()).get("exports", {})
        for kind in MODEL_EXPORTS:
            if kind in exports and (Path(exports[kind]) / "config.json").is_file():
                return Path(exports[kind])
    for sub in ("hf", "merged"):
        if (path / "export" / sub / "config.json").is_file():
            return path / "export" / sub
    return None


def _compose_chained(name: str, out: Path, choices: dict[str, str], debug: bool):
    from orchestrator.config.compose import compose

    overrides: list[str] = [f"+experiment={name}", f"run.output_dir={out}", f"logger={choices.get('logger', 'wandb')}"]
    if debug:
        overrides.append(f"debug={choices['debug']}")
    return compose(overrides)


def _needs_gpus(cfg) -> bool:
    return cfg.cluster.gpus_per_worker > 0 or cfg.rollout.gpus_per_worker > 0


def _as_written_or_shrunk(name: str, out: Path, choices: dict[str, str]):
    """The chained experiment as written; under debug, shrunk like the run it feeds when as
    written it needs GPUs or inputs (e.g. a data file) that only the debug overlay provides."""
    if not choices.get("debug"):
        return _compose_chained(name, out, choices, debug=False)
    try:
        sub, sub_choices = _compose_chained(name, out, choices, debug=False)
        if not _needs_gpus(sub):
            return sub, sub_choices
    except ConfigError:
        pass
    return _compose_chained(name, out, choices, debug=True)


def _run_chained(cfg, choices: dict[str, str], name: str, launch: Callable, prefix: str = "init_from") -> Path:
    from orchestrator.config.validate import validate

    out = Path(cfg.run.output_dir) / f"{prefix}_{name}"
    done = _model_dir(out) if (out / "summary.json").is_file() else None
    if done is not None:
        log.info("chained run %s already complete: reusing %s", name, done)
        return done
    sub, sub_choices = _as_written_or_shrunk(name, out, choices)
    key = (name, sub_choices.get("debug"))
    if _COMPLETED is not None and key in _COMPLETED:  # e.g. the warm-up both the policy and its reward model start from
        log.info("chained run %s already ran in this chain: reusing %s", name, _COMPLETED[key])
        return _COMPLETED[key]
    sub = replace(sub, cluster=cfg.cluster)  # the chained run uses the same cluster as this one
    sub = replace(sub, run=replace(sub.run, eval_after=False))  # the chain's last run is the one evaluated
    if hasattr(sub.method, "export_merged"):  # the next stage starts from a whole model
        sub = replace(sub, method=replace(sub.method, export_merged=True))
    if not sub.checkpoint.export_hf:
        raise ConfigError(
            f"run.init_from=experiment:{name}: that experiment sets checkpoint.export_hf=false, "
            "so it exports no model for the next stage to start from"
        )
    validate(sub)
    log.info("running chained stage %s first (in %s)", name, out)
    result = launch(sub, sub_choices)
    for kind in MODEL_EXPORTS:
        if kind in result["exports"]:
            path = Path(result["exports"][kind])
            if _COMPLETED is not None:
                _COMPLETED[key] = path
            return path
    raise ConfigError(
        f"run.init_from=experiment:{name}: its run exported {sorted(result['exports'])}, no "
        "whole model to start the next stage from"
    )
