"""The two models an evaluation compares, resolved to model specs before any worker starts.

A model is named by a run directory of this project (its exported whole model: `export/hf`,
or `export/merged` of a LoRA run; an adapter-only export is merged onto its base into the
eval run dir), a model directory (`config.json`), or a hub id. The candidate defaults to
the run's own `model` (so `run.init_from` names it); the base defaults to the model the
candidate's run started from, as that run recorded it in its `config.yaml` (a locally
built model is rebuilt from the same config and seed, i.e. the same random weights).
Knowing the candidate's run also gives its training data (the default evaluation data)
and its recipe (for the model card).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from orchestrator.chain import _model_dir
from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.errors import ConfigError, ModelLoadError
from orchestrator.models import model_config

log = logging.getLogger("orchestrator")


@dataclass
class EvalModel:
    """A model of the comparison, with the run that produced it when known."""

    role: str
    """candidate | base."""
    ref: str
    """As the config named it (a path, a hub id, or `model` for the run's own model group)."""
    spec: ModelConfig
    run_dir: Optional[Path] = None
    run_config: Optional[dict[str, Any]] = None

    @property
    def weights(self) -> str:
        """What is loaded: a directory or hub id, or how a locally built model is made."""
        s = self.spec
        return s.pretrained or f"{s.name}: {s.arch} built locally, random init (model.init_seed={s.init_seed})"

    def training_data(self) -> Optional[DataConfig]:
        return _typed(DataConfig, self.run_config["data"]) if self.run_config else None

    def started_from(self) -> Optional[ModelConfig]:
        return _typed(ModelConfig, self.run_config["model"]) if self.run_config else None


def _typed(cls: type, values: dict[str, Any]):
    """`values` (a recorded config section) as the dataclass, ignoring keys it no longer has."""
    known = {f.name for f in dataclasses.fields(cls)}
    node = OmegaConf.merge(OmegaConf.structured(cls), {k: v for k, v in values.items() if k in known})
    return OmegaConf.to_object(node)


def run_dir_of(model_dir: Path) -> Optional[Path]:
    """The run directory whose summary names `model_dir` among its exports, if any."""
    model_dir = model_dir.resolve()
    for cand in (model_dir.parent, model_dir.parent.parent):
        summary = cand / "summary.json"
        if summary.is_file() and (cand / "config.yaml").is_file():
            exports = json.loads(summary.read_text()).get("exports", {})
            if any(Path(p).resolve() == model_dir for p in exports.values()):
                return cand
    return None


def _read_run(run_dir: Optional[Path]) -> Optional[dict[str, Any]]:
    return yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir else None


def resolve(ref: str, role: str, key: str, template: ModelConfig, work_dir: Path) -> EvalModel:
    """The model `ref` names (see the module docstring); `key` is its config key for errors."""
    path = Path(ref).expanduser()
    if not path.exists():
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ref):
            raise ConfigError(
                f"{key}={ref!r}: no such directory (expected a run directory, a model directory or a hub id 'org/name')"
            )
        spec = replace(template, name=ref, pretrained=ref, tokenizer=ref, revision=None)
        try:
            model_config(spec)  # fails here, naming the key, when it is neither a directory nor on the hub
        except ModelLoadError as exc:
            raise ConfigError(f"{key}={ref!r} is not a directory here; as a hub id: {exc}") from exc
        return EvalModel(role, ref, spec)
    run_dir = path if (path / "config.yaml").is_file() and (path / "summary.json").is_file() else None
    model_dir = _model_dir(path) or _merged_adapter(path, run_dir, work_dir / f"merged_{role}", key)
    if run_dir is None:
        run_dir = run_dir_of(model_dir)
    cfg = _read_run(run_dir)
    name = cfg["model"]["name"] if cfg else model_dir.name
    spec = replace(template, name=name, pretrained=str(model_dir), tokenizer=str(model_dir), revision=None)
    return EvalModel(role, ref, spec, run_dir, cfg)


def _merged_adapter(path: Path, run_dir: Optional[Path], out: Path, key: str) -> Path:
    """A PEFT adapter (a directory, or a run's `export/adapter`) merged onto its base, once."""
    adapter = path / "export" / "adapter" if run_dir else path
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"{key}={str(path)!r}: no model there (expected a run directory with an exported model, a "
            "model directory with config.json, or a PEFT adapter directory)"
        )
    if not (out / "config.json").is_file():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        log.info("merging adapter %s onto its base into %s", adapter, out)
        AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload().save_pretrained(out)
        AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(out)
    return out


def resolve_pair(cfg, work_dir: Path) -> tuple[EvalModel, EvalModel]:
    """(candidate, base) of an eval run config."""
    e = cfg.eval
    if e.candidate:
        cand = resolve(e.candidate, "candidate", "eval.candidate", cfg.model, work_dir)
    elif cfg.model.pretrained and Path(cfg.model.pretrained).is_dir():
        cand = resolve(cfg.model.pretrained, "candidate", "model.pretrained", cfg.model, work_dir)
        cand.ref = cfg.model.pretrained
    else:
        cand = EvalModel("candidate", "model", cfg.model)
    if e.base:
        return cand, resolve(e.base, "base", "eval.base", cfg.model, work_dir)
    start = cand.started_from()
    if start is None:
        raise ConfigError(
            f"eval.base is not set and the candidate ({cand.ref}) is not a run of this project, so the model "
            "it started from is unknown; name the base with eval.base=<run dir, model dir or hub id>"
        )
    return cand, EvalModel("base", f"the model {cand.run_dir} started from", replace(start, name=start.name))
