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


def test_progress_lines_show_what_the_step_measured(tmp_path, caplog):
    """A training step's line has its loss and tokens/s; an eval step (no loss, no tokens)
    has neither, rather than `loss nan | tok/s 0`."""
    import logging
    from types import SimpleNamespace

    from orchestrator.config.logger import LoggerConfig
    from orchestrator.tracking import Tracker

    cfg = SimpleNamespace(logger=LoggerConfig(plots=False, mode="disabled"), run=SimpleNamespace(name="t"))
    tracker = Tracker(cfg, tmp_path, {}, total_steps=2, start_step=0)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        tracker.log_step(1, {"loss": 0.5, "tokens": 1000, "step_time": 0.5, "lr": 1e-3})
        tracker.log_step(2, {"eval/accuracy": 0.8})
    tracker.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 1/2 | loss 0.5000 | lr 0.001 | tok/s ") and "ETA" in lines[0]
    assert lines[1].startswith("step 2/2 | elapsed ") and "nan" not in lines[1] and "tok/s" not in lines[1]
