"""`rollout=vllm` settings: a valid choice validates where vLLM is installed, and a bad value of
one of its fields (the GPU-only ones included) fails before any worker starts, with one
message that names the key and the fix; so do a bad `rollout.top_k` and `stage.tis_cap`."""

from __future__ import annotations

import importlib.util

import pytest

from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError

GRPO = ["+experiment=grpo_math", "debug=cpu", "run.init_from=null"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_validates_where_it_is_installed():
    cfg, choices = compose([*GRPO, "rollout=vllm"])
    validate(cfg)
    assert choices["rollout"] == "vllm" and cfg.rollout.engine == "vllm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["rollout.tensor_parallel_size=2"],
            "rollout.tensor_parallel_size=2 applies to rollout=vllm only; set it to 1",
        ),
        (
            ["rollout=vllm", "rollout.tensor_parallel_size=2"],
            "rollout.tensor_parallel_size=2 splits the model over 2 GPUs of one rollout worker, but "
            "rollout.gpus_per_worker=0.0; set rollout.gpus_per_worker=2 (GPU only: on CPU keep tensor_parallel_size=1)",
        ),
        (
            ["rollout=vllm", "rollout.tensor_parallel_size=2", "rollout.placement=colocated"],
            "rollout.tensor_parallel_size=2 needs rollout.placement=separate",
        ),
        (
            ["rollout=vllm", "rollout.gpu_memory_utilization=1.5"],
            "rollout.gpu_memory_utilization=1.5 must be in (0, 1]",
        ),
        (
            ["rollout=vllm", "rollout.max_model_len=6"],
            "rollout.max_model_len=6 must exceed rollout.max_new_tokens=6 (it holds the prompt and the completion)",
        ),
        (["rollout=vllm", "rollout.cpu_kv_cache_gib=0"], "rollout.cpu_kv_cache_gib=0.0 must be > 0"),
    ],
)
def test_bad_vllm_settings_name_the_key_and_the_fix(overrides, message):
    cfg, _ = compose([*GRPO, *overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value)


def test_a_bad_dtype_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        compose([*GRPO, "rollout=vllm", "rollout.dtype=fp8"])
    assert "rollout.dtype" in str(e.value) and "bfloat16" in str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.top_k=-2"], "rollout.top_k=-2 must be >= 1, or 0 (or -1) for off"),
        (["stage.tis_cap=0"], "stage.tis_cap=0.0 must be > 0 (e.g. 2.0), or null for off"),
    ],
)
def test_bad_top_k_or_tis_cap_names_the_key(overrides, message):
    cfg, _ = compose([*GRPO, *overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value)
    ok, _ = compose([*GRPO, "rollout.top_k=-1", "stage.tis_cap=2"])
    validate(ok)
    assert ok.rollout.top_k == -1 and ok.stage.tis_cap == 2.0
