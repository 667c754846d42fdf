"""Cross-field checks that types alone cannot express. Runs before any worker starts.

Each component of the config (the chosen option of every group) owns its rules in its
``check(cfg)`` method (orchestrator/config/schema.py, cluster.py); this module only calls
them, in an order where a check may rely on the ones before it. Each failure raises
ConfigError naming the key, the bad value and what to do instead.
"""

from __future__ import annotations

from orchestrator.config.cluster import slurm_time_seconds
from orchestrator.config.schema import Config

# The cluster first: the worker layout the others divide by comes from it. The method last:
# method=experts builds the model on the meta device to check its selection.
COMPONENTS = (
    "cluster",
    "model",
    "data",
    "train",
    "stage",
    "rollout",
    "eval",
    "backend",
    "checkpoint",
    "logger",
    "run",
    "method",
    "plan",
)


def validate(cfg: Config) -> None:
    """Raise ConfigError at the first component whose check fails."""
    for name in COMPONENTS:
        getattr(cfg, name).check(cfg)


__all__ = ["COMPONENTS", "slurm_time_seconds", "validate"]
