"""Launchers: the only place that knows how a run is started where the GPUs are.

`local` and `ray` run the driver in this process (on an in-process or an existing Ray
cluster). Registry: plain dict, greppable.
"""

from __future__ import annotations

from typing import Callable, Dict

from launchers.local import run_local
from launchers.ray_cluster import run_attached

LAUNCHERS: Dict[str, Callable] = {
    "local": run_local,
    "ray": run_attached,
}
