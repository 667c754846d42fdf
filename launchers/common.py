"""What the submitting launchers (slurm, ray_job, kubernetes) share: the job they submit.

A submitted job runs the same entry, `python -m orchestrator`, on the cluster with the
config resolved and validated here, so what runs there is exactly what was checked here.
The resolved config travels as a Hydra overlay, `<dir>/resolved/config.yaml`:

    # @package _global_
    defaults:                       # the options this config was composed from, with
      - override /method: lora      # the cluster swapped for `ray` (attach to the Ray
      - override /cluster: ray      # cluster the job runs on)
    model: {...}                    # every resolved value
    ...

and the job puts `<dir>` on Hydra's search path and selects it:

    python -m orchestrator 'hydra.searchpath=[file://<dir>]' +resolved=config [overrides]

Overrides after it still apply, so the command also serves to re-run a job by hand. Paths
in the config (run dir, checkpoint dir, local data and models) are made absolute first:
the job does not run in the directory it was submitted from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from orchestrator.config.schema import GROUP_SCHEMAS, ClusterConfig, RayClusterConfig
from orchestrator.errors import ConfigError

RESOLVED_GROUP = "resolved"
REPO = Path(__file__).resolve().parents[1]
# Groups whose option the job selects again: those with a schema per option (a LoRA config
# needs the LoRA schema). Their values, and everything overlays such as experiment and debug
# set, come from the resolved config itself; cluster becomes `ray`.
_REAPPLIED = sorted(set(GROUP_SCHEMAS) - {"cluster"})


def require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"`{name}` is not on PATH; it is needed to {why}.")
    return path


def job_name(cfg) -> str:
    """A name every scheduler accepts (Kubernetes is the strictest: DNS-1123, 63 chars)."""
    name = re.sub(r"[^a-z0-9-]+", "-", cfg.run.name.lower()).strip("-")
    return (name or "run")[:40].rstrip("-")


def job_config(cfg, base: Optional[str] = None) -> dict[str, Any]:
    """The resolved config as the job runs it: cluster=ray with the same worker layout.

    Relative run/checkpoint directories are placed under `base` (the shared volume of a
    pod), or made absolute here when the cluster shares this filesystem (base=None), in
    which case local data and model paths given relative to here are made absolute too.
    """
    d = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    root = base or os.getcwd()
    for section, key in (("run", "output_dir"), ("checkpoint", "dir")):
        if d[section][key] is not None:
            d[section][key] = os.path.normpath(os.path.join(root, os.path.expanduser(d[section][key])))
    if base is None:
        for section, key in (("data", "source"), ("model", "pretrained"), ("model", "tokenizer")):
            value = d[section].get(key)
            if value and not os.path.isabs(value) and os.path.exists(value):
                d[section][key] = os.path.abspath(value)
    shared = {f.name for f in dataclasses.fields(ClusterConfig)} - {"name"}
    d["cluster"] = {"name": "ray", "address": "auto", **{k: v for k, v in d["cluster"].items() if k in shared}}
    RayClusterConfig(**d["cluster"])  # fails here, not in the job, if the two schemas drift
    return d


class _Dumper(yaml.SafeDumper):
    """Manifests and configs a person reads: no anchors, multi-line strings as blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def dump_yaml(data, *, many: bool = False) -> str:
    dump = yaml.dump_all if many else yaml.dump
    return dump(data, Dumper=_Dumper, sort_keys=False)


def overlay_yaml(cfg, choices: dict[str, str], base: Optional[str] = None) -> str:
    overrides = [{f"override /{g}": choices[g]} for g in _REAPPLIED if choices.get(g)]
    body = {"defaults": overrides + [{"override /cluster": "ray"}], **job_config(cfg, base)}
    header = (
        "# @package _global_\n# The resolved config of this job (written by the launcher). "
        "Run it with:\n#   python -m orchestrator 'hydra.searchpath=[file://DIR]' "
        f"+{RESOLVED_GROUP}=config\n# where DIR holds {RESOLVED_GROUP}/config.yaml.\n"
    )
    return header + dump_yaml(body)


def write_overlay(cfg, choices: dict[str, str], root: Path) -> Path:
    path = root / RESOLVED_GROUP / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(overlay_yaml(cfg, choices))
    return path


def allocation_note(c) -> Optional[str]:
    """A hint when the workers leave GPUs of the allocation idle (e.g. a recipe that sets
    cluster.num_workers for one machine, submitted to several nodes)."""
    used, have = c.num_workers * c.gpus_per_worker, c.nodes * c.gpus_per_node
    if have and used < have:
        return (
            f"note: {c.num_workers} worker(s) x {c.gpus_per_worker} GPU use {used} of the {have} GPUs "
            f"allocated; cluster.num_workers={have // max(c.gpus_per_worker, 1)} uses all of them"
        )
    return None


def entry_args(root: str, overrides: list[str] = ()) -> list[str]:
    """`python -m orchestrator` arguments that run the overlay under `root` (on the cluster)."""
    return ["-m", "orchestrator", f"hydra.searchpath=[file://{root}]", f"+{RESOLVED_GROUP}=config", *overrides]


def shell_join(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
