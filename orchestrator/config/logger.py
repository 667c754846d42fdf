"""Typed schema of the `logger` group: where a run's metrics go besides the console and
`<run dir>/metrics.jsonl` (both always on).

`logger` is a multi-select group: `logger=wandb`, `logger=[wandb,mlflow,tensorboard]`.
Each tracker option fills its own sub-node (`logger.wandb`, `logger.mlflow`,
`logger.tensorboard`, None when not selected) with the fields only it has; what every
tracker shares (project, mode, tags, the connection bound, the console interval, whether
the exported model is uploaded, the end-of-run plots) is on :class:`LoggerConfig` itself.
`logger=console` selects no tracker.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from orchestrator.config.checks import Choice, positive
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config.schema import Config


class LoggerMode(Choice):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbLoggerConfig:
    """`logger=wandb`: Weights & Biases (online with an API key, offline otherwise)."""

    entity: Optional[str] = None
    """W&B entity (team or user); None: the API key's default entity."""


@dataclass
class MlflowLoggerConfig:
    """`logger=mlflow`: an MLflow run per run directory (a resumed run continues it)."""

    tracking_uri: Optional[str] = None
    """Tracking server or store URI; None: $MLFLOW_TRACKING_URI, else a local store in the run
    directory (`sqlite:///<run dir>/mlflow/mlflow.db`, artifacts beside it)."""
    registered_model: Optional[str] = None
    """On PROMOTE from the evaluation gate (`stage=eval`, `run.eval_after`), register the
    promoted model as a new version of this registered model, with the gate's metrics as tags
    (None: no registration)."""


@dataclass
class TensorBoardLoggerConfig:
    """`logger=tensorboard`: event files readable by `tensorboard --logdir`."""

    log_dir: Optional[str] = None
    """Event file directory; None: `<run dir>/tensorboard`."""


@dataclass
class LoggerConfig:
    """What every tracker shares; the chosen trackers are the sub-nodes that are set."""

    project: str = "orchestrator"
    """W&B project and MLflow experiment name."""
    mode: LoggerMode = LoggerMode.auto
    """auto (each tracker online when it has a server: W&B with an API key, MLflow with a
    tracking URI; local otherwise) | online | offline (W&B offline, MLflow in the local store)
    | disabled (no tracker: console and metrics.jsonl only)."""
    tags: list[str] = field(default_factory=list)
    """Run tags (W&B tags, MLflow run tags)."""
    log_every: int = 1
    """Console progress interval in steps (metrics.jsonl and the trackers get every step)."""
    timeout_s: float = 30.0
    """Bound on what an unreachable tracker may cost: W&B's online init (then offline), MLflow's
    connection at start (then the local store) and its final flush. A tracker that fails never
    stops training; it says once what it did."""
    log_model: bool = True
    """Upload the exported model or adapter to the trackers that keep artifacts (W&B, MLflow)."""
    plots: bool = True
    """Write PNG charts of the run's metrics to `<run dir>/plots` at the end of the run."""
    wandb: Optional[WandbLoggerConfig] = None
    """Set by `logger=wandb`."""
    mlflow: Optional[MlflowLoggerConfig] = None
    """Set by `logger=mlflow`."""
    tensorboard: Optional[TensorBoardLoggerConfig] = None
    """Set by `logger=tensorboard`."""

    @property
    def trackers(self) -> list[str]:
        """The chosen trackers (none when `mode` is disabled)."""
        if self.mode == LoggerMode.disabled:
            return []
        return [name for name in ("wandb", "mlflow", "tensorboard") if getattr(self, name) is not None]

    def check(self, cfg: Config) -> None:
        positive(self.log_every, "logger.log_every")
        positive(self.timeout_s, "logger.timeout_s")
        needs = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
        for name in self.trackers:
            if importlib.util.find_spec(needs[name]) is None:
                raise ConfigError(
                    f"logger={name} needs the {needs[name]} package: pip install -e '.[tracking]' "
                    f"(or choose another logger, e.g. logger=console)"
                )
        if self.mlflow is not None and self.mlflow.registered_model == "":
            raise ConfigError("logger.mlflow.registered_model='' is empty: name the registered model, or set null")
