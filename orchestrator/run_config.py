"""The run's config record: `config.yaml` is the config a run started with; a resumed run
may change only what leaves the checkpoint's meaning intact.

On a resume, the new config is compared with the recorded one before anything is written:
a change to the model, the method, the stage or the backend (shapes, the objective, the
checkpoint layout) stops the run with the differences listed; other changes (steps,
batch and logging settings, cadence) are allowed and recorded in
`config_history/<n>.yaml` (the differences and when), never overwriting the original.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from orchestrator.errors import ConfigError

log = logging.getLogger("orchestrator")
FIXED = ("model", "method", "stage", "backend.name")
"""Config paths a resumed run must not change."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _fixed(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FIXED)


def record_config(run_dir: Path, config: dict, resuming: bool) -> None:
    """Write `config.yaml` for a fresh run; on a resume, refuse incompatible changes and record
    compatible ones in config_history/ (config.yaml stays the original)."""
    path = run_dir / "config.yaml"
    if not (resuming and path.is_file()):
        path.write_text(OmegaConf.to_yaml(config))
        return
    diffs = differences(yaml.safe_load(path.read_text()) or {}, config)
    bad = {k: v for k, v in diffs.items() if _fixed(k)}
    if bad:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(bad.items())[:8])
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with another model/method/stage/backend ({listed}"
            f"{'; ...' if len(bad) > 8 else ''}). Resuming would load them into a different model. Use a new "
            "run.output_dir (or run.name) for this config, or start from that run's export with "
            "run.init_from=<run dir>."
        )
    if not diffs:
        return
    history = run_dir / "config_history"
    history.mkdir(exist_ok=True)
    n = len(list(history.glob("*.yaml"))) + 1
    when = datetime.datetime.now().isoformat(timespec="seconds")
    record = {"resumed_at": when, "changed": {k: {"was": a, "now": b} for k, (a, b) in diffs.items()}}
    (history / f"{n:03d}.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    log.info(
        "resuming with changed settings (recorded in %s): %s",
        history / f"{n:03d}.yaml",
        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diffs.items()),
    )
