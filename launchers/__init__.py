"""Launchers: the only place that knows how a run is started where the GPUs are.

`local` and `ray` run the driver in this process (on an in-process or an existing Ray
cluster). `slurm`, `ray_job` and `kubernetes` submit a job that runs the same entry with
the resolved config on the cluster, attached to Ray there (launchers/common.py).
Registry: plain dict, greppable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from launchers.local import run_local
from launchers.ray_cluster import run_attached


def _submitter(module: str) -> Callable:
    """`module.submit`, imported on use: `python -m launchers.ray_job ...` must not find its
    own module already imported by this package, and their libraries load only when used."""

    def submit(cfg, choices: dict[str, str]):
        return importlib.import_module(module).submit(cfg, choices)

    return submit


LAUNCHERS: dict[str, Callable] = {
    "local": run_local,
    "ray": run_attached,
    "slurm": _submitter("launchers.slurm"),
    "ray_job": _submitter("launchers.ray_job"),
    "kubernetes": _submitter("launchers.kubernetes"),
}
