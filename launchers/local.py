"""cluster=local: start Ray in-process on this machine and run the driver here."""

from __future__ import annotations

import logging
import os
from typing import Any


def run_local(cfg, choices: dict[str, str]) -> dict[str, Any]:
    import ray

    from orchestrator.chain import resolve_init_from
    from orchestrator.driver import Driver
    from orchestrator.runlock import RunDirLock

    # The run dir's lock before Ray starts: a busy run dir is refused at once.
    with RunDirLock(cfg.run.output_dir):
        started = not ray.is_initialized()
        if started:  # tests and notebooks may already hold a Ray session: reuse it
            num_cpus = cfg.cluster.num_cpus or _cpus_needed(cfg)
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
            logging.getLogger("orchestrator").info("ray: started in this process (%d logical CPUs)", num_cpus)
        try:
            cfg = resolve_init_from(cfg, choices, run_local)  # chained stages run here first
            return Driver(cfg, choices).run()
        finally:
            if started:
                ray.shutdown()


def _cpus_needed(cfg) -> int:
    """Logical CPUs for the local Ray: all cores, or more when the workers ask for more
    (actors then time-share the cores, which is what a laptop smoke run wants)."""
    need = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    from orchestrator.stages import STAGES

    r = cfg.rollout
    if (STAGES[cfg.stage.name].uses_rollout or cfg.run.eval_after) and r.placement == "separate":
        need += r.num_workers * r.cpus_per_worker
    return max(os.cpu_count() or 1, need)
