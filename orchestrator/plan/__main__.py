"""`python -m orchestrator.plan [overrides...] [--json]`: the memory and time plan of a run.

python -m orchestrator.plan +experiment=sft_lora cluster.num_workers=8 plan.device=h100_80gb
python -m orchestrator.plan +experiment=sft_lora --json     # machine-readable

Composes the config exactly as `python -m orchestrator` does and validates it (less the
checks of this machine's GPUs and tools); exits 0 when the
run fits, 3 when it does not, 2 on a config error.
"""

from __future__ import annotations

import sys
from typing import Optional

from orchestrator.config.checks import positive
from orchestrator.config.compose import compose
from orchestrator.config.validate import COMPONENTS
from orchestrator.errors import OrchestratorError
from orchestrator.plan import plan, render

DOES_NOT_FIT = 3
PLACE_CHECKS = ("cluster", "logger")
"""Components whose checks look at this machine rather than at the run's shape."""


def check(cfg) -> None:
    """The entry's validation, less the checks of this machine (its GPUs, the cluster's
    tools): a plan is for the devices the run will get."""
    positive(cfg.cluster.num_workers, "cluster.num_workers")
    for name in COMPONENTS:
        if name not in PLACE_CHECKS:
            getattr(cfg, name).check(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__.strip())
        return 0
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    try:
        cfg, _ = compose(args)
        check(cfg)
        p = plan(cfg)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(p.to_json() if as_json else render(p))
    return 0 if p.fits else DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
