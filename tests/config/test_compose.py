"""Config composition and validation: every shipped experiment composes, bad input fails
early with a message naming the key and the valid choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.__main__ import main
from orchestrator.config.compose import compose, group_options
from orchestrator.config.schema import Config, LoraMethodConfig
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from tests.conftest import REPO

EXPERIMENTS = group_options("experiment")


def test_default_composes_to_typed_config():
    cfg, choices = compose([])
    assert isinstance(cfg, Config)
    assert choices["model"] == "tiny_llama" and choices["backend"] == "fsdp2"
    validate(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("debug", [False, True])
def test_every_experiment_composes_and_validates(experiment, debug):
    overrides = [f"+experiment={experiment}"] + (["debug=cpu"] if debug else [])
    try:
        cfg, _ = compose(overrides)
    except ConfigError as e:  # recipes for the user's own data require the data path
        assert "'data.source' is required" in str(e)
        cfg, _ = compose(overrides + ["data.source=/data/train.jsonl"])
    assert cfg.run.name == experiment
    if debug or cfg.cluster.gpus_per_worker == 0:
        validate(cfg)
    if debug:  # debug=cpu must win over the experiment, whatever the argument order
        assert cfg.cluster.gpus_per_worker == 0 and cfg.model.pretrained is None
        assert cfg.data.source.startswith("synthetic:")


def test_debug_before_experiment_still_applies_last():
    cfg, _ = compose(["debug=cpu", "+experiment=sft_lora"])
    assert cfg.cluster.gpus_per_worker == 0 and cfg.model.name == "tiny_llama"
    assert isinstance(cfg.method, LoraMethodConfig)


def test_bad_group_option_lists_valid_options():
    with pytest.raises(ConfigError) as e:
        compose(["method=lorra"])
    msg = str(e.value)
    assert "'lorra' is not an option of config group 'method'" in msg
    assert "Did you mean 'lora'" in msg and "full, lora" in msg


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        compose(["train.learning_rate=1e-3"])
    msg = str(e.value)
    assert "train.learning_rate" in msg and "micro_batch_size" in msg and "lr" in msg


def test_option_specific_key_on_wrong_option_says_which_option_has_it():
    with pytest.raises(ConfigError) as e:
        compose(["method=full", "method.r=16"])
    assert "'r' belongs to method=lora" in str(e.value)


def test_bad_type_names_key():
    with pytest.raises(ConfigError) as e:
        compose(["train.max_steps=ten"])
    assert "train.max_steps" in str(e.value) and "ten" in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.scheduler=cosinus",
            "train.scheduler='cosinus' is not valid. Valid values: cosine, linear, constant",
        ),
        (
            "data.batching=bucketed",
            "data.batching='bucketed' is not valid. Valid values: packed, padded",
        ),
        (
            "checkpoint.resume=maybe",
            "checkpoint.resume='maybe' is not valid. Valid values: auto, must, never",
        ),
        (
            "cluster.placement_strategy=RANDOM",
            "cluster.placement_strategy='RANDOM' is not valid. Valid values: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD",
        ),
    ],
)
def test_choice_errors_fail_at_compose_naming_key_and_valid_values(override, message):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.global_batch_size=7", "train.global_batch_size"),
        ("train.micro_batch_size=3", "train.micro_batch_size"),
        ("cluster.gpus_per_worker=1", "cluster.gpus_per_worker"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("eval.samples=-1", "eval.samples"),
    ],
)
def test_semantic_errors_name_the_key(override, key):
    import torch

    if key == "cluster.gpus_per_worker" and torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    cfg, _ = compose([override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_entry_exits_2_with_message_before_starting_anything(capsys):
    assert main(["+experiment=sft_tiny", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "train.lrr" in err and "Did you mean 'train.lr'" in err


def test_cfg_job_prints_resolved_config():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "+experiment=sft_tiny",
            "train.lr=0.5",
            "--cfg",
            "job",
        ],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "lr: 0.5" in out.stdout and "output_dir: outputs/sft_tiny" in out.stdout
    assert "${" not in out.stdout  # interpolations resolved


def test_help_lists_groups():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "experiment" in out.stdout and "sft_tiny" in out.stdout
    assert "rollout     hf, vllm" in out.stdout and "eval        default" in out.stdout


def test_added_key_on_the_wrong_option_is_refused_not_dropped():
    with pytest.raises(ConfigError) as e:
        compose(["method=full", "+method.r=3"])
    assert "unknown key 'method.r'" in str(e.value) and "method=lora" in str(e.value)
    with pytest.raises(ConfigError, match="backend.extra"):
        compose(["backend=fsdp2", "+backend.extra.x=1"])
