"""The `logger` group as users write it: one tracker, several at once (Hydra's multi-select,
each option filling its own sub-node), none, the common keys, and a submitted job that
re-composes the same trackers."""

from __future__ import annotations

import pytest

from launchers.common import entry_args, write_overlay
from orchestrator.config.compose import compose
from orchestrator.config.logger import MlflowLoggerConfig, TensorBoardLoggerConfig, WandbLoggerConfig
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError


@pytest.mark.parametrize(
    "overrides, trackers",
    [
        ([], ["wandb"]),  # the default
        (["logger=wandb"], ["wandb"]),
        (["logger=console"], []),
        (["logger=[wandb,mlflow]"], ["wandb", "mlflow"]),
        (["logger=[mlflow,tensorboard,wandb]"], ["wandb", "mlflow", "tensorboard"]),
        (["logger=[tensorboard]"], ["tensorboard"]),
        (["logger=[wandb,mlflow]", "logger.mode=disabled"], []),
    ],
)
def test_logger_selects_the_trackers(overrides, trackers):
    cfg, _ = compose(["+experiment=sft_tiny", *overrides])
    validate(cfg)
    assert cfg.logger.trackers == trackers
    types = {"wandb": WandbLoggerConfig, "mlflow": MlflowLoggerConfig, "tensorboard": TensorBoardLoggerConfig}
    chosen = trackers or ([] if "logger.mode=disabled" not in overrides else ["wandb", "mlflow"])
    for name, typ in types.items():
        node = getattr(cfg.logger, name)
        assert isinstance(node, typ) if name in chosen else node is None, name


def test_common_keys_and_per_tracker_keys():
    cfg, _ = compose(
        [
            "logger=[wandb,mlflow,tensorboard]",
            "logger.project=team",
            "logger.mode=offline",
            "logger.log_every=5",
            "logger.timeout_s=3",
            "logger.tags=[a,b]",
            "logger.wandb.entity=me",
            "logger.mlflow.tracking_uri=http://127.0.0.1:5000",
            "logger.mlflow.registered_model=chat-model",
            "logger.tensorboard.log_dir=/tmp/tb",
        ]
    )
    lg = cfg.logger
    assert (lg.project, lg.mode, lg.log_every, lg.timeout_s, lg.tags) == ("team", "offline", 5, 3.0, ["a", "b"])
    assert lg.wandb.entity == "me" and lg.tensorboard.log_dir == "/tmp/tb"
    assert lg.mlflow == MlflowLoggerConfig(tracking_uri="http://127.0.0.1:5000", registered_model="chat-model")


def test_bad_common_values_fail_validation_naming_the_key():
    with pytest.raises(ConfigError, match="logger.timeout_s=0.0 must be > 0"):
        validate(compose(["logger.timeout_s=0"])[0])
    with pytest.raises(ConfigError, match="logger.mode='loud' is not valid"):
        compose(["logger.mode=loud"])


def test_a_submitted_job_recomposes_the_same_trackers(tmp_path):
    for i, overrides in enumerate(
        (
            ["logger=[mlflow,tensorboard]", "logger.mlflow.registered_model=m", "logger.project=p"],
            ["logger=console"],
            ["logger=wandb", "logger.wandb.entity=me"],
        )
    ):
        cfg, choices = compose(["+experiment=sft_tiny", "cluster=ray_job", *overrides])
        root = tmp_path / f"job{i}"
        write_overlay(cfg, choices, root)
        job, _ = compose(entry_args(str(root))[2:])
        assert job.logger == cfg.logger, overrides
