"""cluster=ray: attach to a running Ray cluster and run the driver in this process.

Every node must have this package installed (our docker image, or the same environment
on each node); the checkpoint directory must be on storage all nodes share.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

from orchestrator.errors import ConfigError


def run_attached(cfg, choices: Dict[str, str]) -> Dict[str, Any]:
    import ray

    from orchestrator.driver import Driver

    if not ray.is_initialized():
        try:
            ray.init(address=cfg.cluster.address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"cannot reach a Ray cluster at cluster.address={cfg.cluster.address!r} ({exc}). Start one "
                "with `ray start --head`, pass its address (host:6379), or use cluster=local.") from exc
    try:
        return Driver(cfg, choices).run()
    finally:
        ray.shutdown()
