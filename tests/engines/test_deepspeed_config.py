"""backend=deepspeed_zero3 configuration: the DeepSpeed config is generated from the typed
config, and bad input fails at compose/validate time with a message naming the key."""

from __future__ import annotations

import sys

import pytest

from orchestrator.__main__ import main
from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError

DS = ["+experiment=sft_tiny", "backend=deepspeed_zero3"]


def _ds_config(*overrides, world_size=2, on_gpu=False):
    from orchestrator.engines.deepspeed_zero3 import ds_config

    cfg, _ = compose([*DS, *overrides])
    validate(cfg)
    return ds_config(cfg, world_size, on_gpu)


def test_generated_config_follows_the_typed_config():
    c = _ds_config("train.global_batch_size=16", "train.micro_batch_size=2", "train.max_grad_norm=0.5")
    assert c["zero_optimization"] == {"stage": 3}
    batch = c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]
    assert batch == (2, 4, 16)
    assert c["gradient_clipping"] == 0.5
    assert c["bf16"] == {"enabled": False} and "fp16" not in c  # fp32 on CPU
    assert "optimizer" not in c and "scheduler" not in c  # the client AdamW + schedule, as FSDP2

    gpu = _ds_config(on_gpu=True)
    assert gpu["bf16"] == {"enabled": True} and gpu["communication_data_type"] == "fp32"
    assert _ds_config("backend.mixed_precision=fp32", on_gpu=True)["bf16"] == {"enabled": False}


def test_offload_and_extra_keys_are_merged():
    c = _ds_config(
        "backend.offload_optimizer=cpu",
        "backend.offload_param=cpu",
        "+backend.extra.zero_optimization.stage3_prefetch_bucket_size=1000",
        "+backend.extra.zero_optimization.offload_optimizer.ratio=0.5",
        "+backend.extra.flops_profiler.enabled=true",
    )
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_prefetch_bucket_size"] == 1000
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False, "ratio": 0.5}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert c["flops_profiler"] == {"enabled": True}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend=fsdp2", "backend.offload_optimizer=cpu"], "'offload_optimizer' belongs to backend=deepspeed_zero3"),
        (["backend=fsdp2", "backend.extra.train_batch_size=3"], "'extra' belongs to backend=deepspeed_zero3"),
        (
            ["backend=deepspeed_zero3", "backend.reshard_after_forward=false"],
            "'reshard_after_forward' belongs to backend=fsdp2",
        ),
    ],
)
def test_an_option_of_the_other_backend_fails_at_compose(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+backend.extra.zero_optimization.stage=2", "runs ZeRO stage 3 only"),
        (
            "+backend.extra.gradient_accumulation_steps=4",
            "set train.global_batch_size / train.micro_batch_size instead",
        ),
        ("+backend.extra.fp16.enabled=true", "set backend.mixed_precision"),
        ("+backend.extra.zero_optimization.offload_param.device=nvme", "set backend.offload_param instead"),
        ("backend.offload_optimizer=gpu", "backend.offload_optimizer='gpu' is not valid. Valid values: none, cpu"),
    ],
)
def test_bad_deepspeed_settings_fail_before_any_worker_starts(tmp_path, capsys, override, message):
    rc = main([*DS, override, f"run.output_dir={tmp_path / 'run'}"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_deepspeed_names_the_extra_to_install(monkeypatch):
    from orchestrator.engines.deepspeed_zero3 import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` sees when not installed
    cfg, _ = compose(DS)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[deepspeed\]"'):
        validate(cfg)  # on the driver, before workers start
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[deepspeed\]"'):
        import_deepspeed()  # and on a worker whose node lacks it
