"""cluster=local: start Ray in-process on this machine and run the driver here."""

from __future__ import annotations

import logging
from typing import Any, Dict


def run_local(cfg, choices: Dict[str, str]) -> Dict[str, Any]:
    import ray

    from orchestrator.driver import Driver

    started = not ray.is_initialized()
    if started:  # tests and notebooks may already hold a Ray session: reuse it
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    try:
        return Driver(cfg, choices).run()
    finally:
        if started:
            ray.shutdown()
