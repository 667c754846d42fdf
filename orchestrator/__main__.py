"""`python -m orchestrator [overrides...]`: compose -> validate -> launch -> close.

python -m orchestrator +experiment=sft_tiny
python -m orchestrator +experiment=sft_tiny method=lora train.max_steps=100
python -m orchestrator +experiment=sft_tiny --cfg job     # print the resolved config
python -m orchestrator --help                             # groups and their options
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from orchestrator.config.compose import compose, group_options, to_yaml
from orchestrator.config.validate import validate
from orchestrator.errors import OrchestratorError

INTERRUPTED_EXIT = 130  # 128 + SIGINT
GROUPS = [
    "model",
    "method",
    "stage",
    "backend",
    "cluster",
    "rollout",
    "data",
    "logger",
    "checkpoint",
    "eval",
    "experiment",
    "debug",
]


def _help() -> str:
    lines = [__doc__.strip(), "", "Config groups (choose with group=option; experiment and debug add a recipe):"]
    lines += [f"  {g:<11} {', '.join(group_options(g))}" for g in GROUPS]
    lines += [
        "",
        "Any field can be set with dotted keys, e.g. train.lr=1e-4 cluster.num_workers=8.",
        "See the resolved config with --cfg job.",
        "Memory and time per device before a run: python -m orchestrator.plan <the same overrides>.",
    ]
    return "\n".join(lines)


def _remove_handlers() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_orchestrator", False):
            root.removeHandler(h)
            h.close()


def setup_logging(run_dir: Optional[Path]) -> None:
    _remove_handlers()
    root = logging.getLogger()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._orchestrator = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "ray", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_help())
        return 0
    # Handlers left by an earlier call in this process write to that call's run dir and
    # stderr; errors before this run's logging is set up go straight to stderr.
    _remove_handlers()
    show_cfg = "--cfg" in args
    if show_cfg:
        i = args.index("--cfg")
        del args[i : i + 2 if i + 1 < len(args) and args[i + 1] in ("job", "all") else i + 1]
    try:
        cfg, choices = compose(args)
        if show_cfg:
            print(to_yaml(cfg))
            return 0
        validate(cfg)
        setup_logging(Path(cfg.run.output_dir))
        from launchers import LAUNCHERS

        # A launcher that runs the driver here resolves run.init_from chains itself;
        # submitted jobs resolve them where they run.
        LAUNCHERS[cfg.cluster.name](cfg, choices)
        return 0
    except OrchestratorError as exc:
        prefix = getattr(exc, "report_prefix", None)
        _report(f"{prefix} {exc}" if prefix else f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (the first one checkpoints)
        _report(
            "interrupted: stopped without a checkpoint of the current step; the latest complete "
            "checkpoint is intact. Run the same command again to resume."
        )
        return INTERRUPTED_EXIT


def _report(line: str) -> None:
    """One line on stderr (and in train.log once logging is set up), never twice."""
    if any(getattr(h, "_orchestrator", False) for h in logging.getLogger().handlers):
        logging.getLogger("orchestrator").error(line)
    else:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
