"""DPO and KTO stages on the driver side, against worker groups that run in this process
on a real tiny model (no Ray): which role computes the reference, what the micro-batches
carry, and that the loss of a step does not depend on the split over ranks and
micro-batches. Config mistakes fail with one message naming the key."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.data.table import TokenTable
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.models import build_model, build_tokenizer
from orchestrator.models.logprobs import token_logprobs
from orchestrator.roles import REFERENCE, Roles
from orchestrator.stages import STAGES

BASE = ["+experiment=dpo_ultrafeedback", "debug=cpu", "run.init_from=null", "eval.samples=0", "data.num_samples=24"]


class LocalGroup:
    """The WorkerGroup surface a stage uses, computed in this process on one real model: every
    rank's micro-batches go through it, as the ranks of a real group would. `train_step`
    backpropagates nothing; it records the sum of the rank losses / world size, which is what
    the gradient all-reduce averages into the global loss."""

    def __init__(self, model, world: int, loss=None, reference_model=None):
        self.model, self.world_size, self.loss_fn, self.ref = model, world, loss, reference_model
        self.calls: list[tuple[str, Any, dict]] = []
        self.pg = None
        self.global_losses: list[float] = []

    def call_per_rank(self, method: str, per_rank, **kwargs) -> list[Any]:
        assert len(per_rank) == self.world_size
        self.calls.append((method, per_rank, kwargs))
        if method == "forward_logprobs":
            model = self.ref if kwargs.get("reference") else self.model
            with torch.no_grad():
                return [[token_logprobs(model, mb, 256)[0] for mb in mbs] for mbs in per_rank]
        assert method == "train_step"
        out, total = [], 0.0
        for mbs in per_rank:
            sums: dict[str, float] = {}
            for mb in mbs:
                loss, metrics = self.loss_fn(self.model, mb)
                total += float(loss.detach()) / self.world_size
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            out.append(sums | {"grad_norm": 1.0, "lr": 1e-3, "skipped": 0.0, "local_finite": 1.0})
        self.global_losses.append(total)
        return out


@pytest.fixture(scope="module")
def models():
    from orchestrator.config.schema import ModelConfig

    spec = ModelConfig(name="tiny_llama")
    policy = build_model(spec, torch.float32)
    ref = build_model(ModelConfig(name="tiny_llama", init_seed=7), torch.float32)
    return policy, ref


def _stage(*overrides: str):
    cfg, _ = compose([*BASE, *overrides])
    validate(cfg)
    return cfg, STAGES[cfg.stage.name](cfg, build_tokenizer(cfg.model))


def _roles(stage, models, world: int, frozen: bool) -> tuple[Roles, LocalGroup, LocalGroup | None]:
    policy_model, ref_model = models
    policy = LocalGroup(policy_model, world, type(stage).loss, reference_model=None if frozen else ref_model)
    groups = {"policy": policy}
    ref = None
    if frozen:
        ref = groups[REFERENCE] = LocalGroup(ref_model, world)
    return Roles(groups=groups, specs=stage.roles()), policy, ref


@pytest.mark.parametrize(
    "overrides, reference_role",
    [
        (["method=full"], True),
        (["method=lora"], False),
        (["method=full", "stage.loss=simpo"], False),
        (["method=full", "stage.precompute_ref=true"], False),
        (["method=lora", "method.init_lora_weights=pissa"], True),  # adapters off is the residual
        (["method=lora", "method.use_dora=true", "method.use_rslora=true"], False),
        (["method=bitfit", "model=tiny_qwen2"], True),
    ],
    ids=["full", "lora", "full-simpo", "full-precompute", "lora-pissa", "lora-dora-rslora", "bitfit"],
)
def test_dpo_declares_a_frozen_reference_only_when_the_method_has_none_inside(overrides, reference_role):
    _, stage = _stage(*overrides)
    roles = stage.roles()
    assert (REFERENCE in roles) is reference_role
    if reference_role:
        ref = roles[REFERENCE]
        assert not ref.trainable and ref.colocate_with == "policy" and ref.method.name == "full"
    assert roles["policy"].trainable and roles["policy"].loss is type(stage).loss


@pytest.mark.parametrize("method, frozen", [("full", True), ("lora", False)])
def test_dpo_step_takes_reference_from_the_methods_reference_and_ships_it(models, method, frozen):
    _, stage = _stage(
        f"method={method}", "cluster.num_workers=2", "train.global_batch_size=8", "train.micro_batch_size=2"
    )
    roles, policy, ref = _roles(stage, models, 2, frozen)
    metrics = stage.step(roles, 1)
    names = [c[0] for c in policy.calls]
    if frozen:
        assert names == ["train_step"] and [c[0] for c in ref.calls] == ["forward_logprobs"]
        assert ref.calls[0][2] == {}
    else:
        assert names == ["forward_logprobs", "train_step"] and policy.calls[0][2] == {"reference": True}
    trained = policy.calls[-1][1]
    assert [len(mbs) for mbs in trained] == [2, 2]  # 8 pairs, 2 ranks, 2 pairs per micro-batch
    for mb in (mb for mbs in trained for mb in mbs):
        assert mb["input_ids"].shape[0] == 4 and mb["ref_logps"].shape == (4,)  # chosen rows, then rejected
        assert mb["num_pairs"] == 8 and mb["world_size"] == 2
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in metrics, key
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    # the reference is another model: rewards are not all zero
    assert metrics["rewards/chosen"] != 0.0 and 0.0 <= metrics["rewards/accuracies"] <= 1.0


@pytest.mark.parametrize(
    "variant",
    [["stage.loss=sigmoid", "stage.sft_weight=0.5"], ["stage.loss=ipo"], ["stage.loss=orpo", "stage.sft_weight=0"]],
)
def test_dpo_loss_of_a_step_does_not_depend_on_ranks_and_micro_batches(models, variant):
    # 5 pairs on 2 ranks, 2 per micro-batch: rank 1 runs an empty pair beside its 2 (ranks
    # must run as many forwards as each other), which must weigh nothing.
    losses = []
    for world, micro in ((1, 5), (2, 2)):
        _, stage = _stage(
            "method=full",
            f"cluster.num_workers={world}",
            "train.global_batch_size=5",
            f"train.micro_batch_size={micro}",
            *variant,
        )
        roles, policy, _ = _roles(stage, models, world, frozen=not stage.reference_free)
        metrics = stage.step(roles, 1)
        assert policy.global_losses[-1] == pytest.approx(metrics["loss"], rel=1e-5)
        losses.append(metrics["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_precomputed_reference_is_stored_reused_on_resume_and_refused_once_trained(models, tmp_path):
    common = ["method=full", "stage.precompute_ref=true", f"run.output_dir={tmp_path}", "train.global_batch_size=8"]
    _, stage = _stage(*common)
    roles, policy, _ = _roles(stage, models, 2, frozen=False)
    stage.setup(roles, 0, None)
    # before the first update the policy is the reference: its forward gives the store
    assert [c[0] for c in policy.calls] == ["forward_logprobs"] and policy.calls[0][2] == {}
    assert (tmp_path / "reference_logps.pt").is_file() and stage.ref_cache["train"].shape == (24, 2)
    stage.step(roles, 1)
    assert [c[0] for c in policy.calls] == ["forward_logprobs", "train_step"]  # no reference pass per step
    first = policy.calls[-1][1][0][0]
    idx = first["index"]
    want = torch.cat([stage.ref_cache["train"][idx, 0], stage.ref_cache["train"][idx, 1]])
    assert torch.equal(first["ref_logps"], want)

    _, resumed = _stage(*common)
    roles, policy, _ = _roles(resumed, models, 2, frozen=False)
    resumed.setup(roles, 1, None)
    assert policy.calls == [] and torch.equal(resumed.ref_cache["train"], stage.ref_cache["train"])
    (tmp_path / "reference_logps.pt").unlink()
    with pytest.raises(OrchestratorError, match="no longer the reference"):
        resumed.setup(roles, 1, None)


def test_kto_step_estimates_kl_from_mismatched_pairs_and_splits_invariantly(models):
    losses = []
    for world, micro in ((1, 5), (2, 2)):
        _, stage = _stage(
            "stage=kto", "method=full", f"cluster.num_workers={world}", "train.global_batch_size=5",
            f"train.micro_batch_size={micro}",
        )  # fmt: skip
        roles, policy, ref = _roles(stage, models, world, frozen=True)
        metrics = stage.step(roles, 1)
        # policy: KL forward, then the update; reference: KL forward, then the matched examples
        assert [c[0] for c in policy.calls] == ["forward_logprobs", "train_step"]
        assert [c[0] for c in ref.calls] == ["forward_logprobs", "forward_logprobs"]
        kl_rows = [row for mbs in policy.calls[0][1] for mb in mbs for row in mb["input_ids"].tolist()]
        train_rows = [row for mbs in policy.calls[1][1] for mb in mbs for row in mb["input_ids"].tolist()]
        assert kl_rows != train_rows and len(kl_rows) == len(train_rows)
        assert metrics["kl"] >= 0 and 0 < metrics["desirable_fraction"] < 1
        assert policy.global_losses[-1] == pytest.approx(metrics["loss"], rel=1e-5)
        losses.append(metrics["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_kto_mismatched_pairs_rotate_completions_within_the_batch():
    from orchestrator.stages.kto import mismatched

    batch = [{"prompt_ids": [i], "completion_ids": [10 + i], "label": i % 2 == 0} for i in range(3)]
    assert [(e["prompt_ids"], e["completion_ids"]) for e in mismatched(batch)] == [
        ([0], [12]),
        ([1], [10]),
        ([2], [11]),
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["stage.loss=hinge", "stage.label_smoothing=0.1"],
            "stage.label_smoothing=0.1 has no effect with stage.loss=hinge",
        ),
        (["stage.label_smoothing=0.5"], r"stage.label_smoothing=0.5 must be in \[0, 0.5\)"),
        (["stage.gamma=1.0"], "stage.gamma=1.0 is SimPO's target margin"),
        (["stage.loss=orpo", "stage.sft_weight=0.5"], "already contains the NLL"),
        (["stage.loss=simpo", "stage.precompute_ref=true"], "reference-free, there is nothing to precompute"),
        (["stage.beta=0"], "stage.beta=0.0 must be > 0"),
        (["stage.loss=dpo"], "stage.loss='dpo' is not valid. Valid values: sigmoid, ipo, hinge, robust, simpo, orpo"),
        (["stage=kto", "train.global_batch_size=1"], "KTO estimates its KL term"),
        (["stage=kto", "stage.desirable_weight=0", "stage.undesirable_weight=0"], "both 0"),
    ],
)
def test_bad_preference_config_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _stage(*overrides)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_sft_data_for_a_preference_stage_says_which_data_to_use(stage):
    with pytest.raises(ConfigError, match=f"no preference rows for stage={stage}.*data=arithmetic_pairs"):
        _stage(f"stage={stage}", "data.source=synthetic:instruct")


@pytest.mark.parametrize(
    "overrides, what",
    [
        (["stage=dpo"], "pairs"),
        (["stage=kto"], "examples"),
        (["+experiment=grpo_math", "debug=cpu", "run.init_from=null", "eval.samples=0"], None),
    ],
)
def test_stages_read_prepared_data_as_the_in_memory_path(overrides, what, tmp_path, caplog):
    """DPO, KTO and GRPO read the prepared (cached, memory-mapped) examples of their row kind:
    the same examples, batches and truncation counts as with `data.cache=false`."""
    limits = ["data.max_prompt_len=12", "data.truncate=true"] if what else []
    stages, logged = {}, {}
    for cached in ("true", "false"):
        caplog.clear()
        with caplog.at_level("INFO", logger="orchestrator"):
            args = [*overrides, *limits, f"data.cache={cached}", f"data.cache_dir={tmp_path}"]
            if what is None:  # GRPO: its own experiment, not the preference BASE
                cfg, _ = compose([*args, "data.num_samples=24"])
                validate(cfg)
                stages[cached] = STAGES[cfg.stage.name](cfg, build_tokenizer(cfg.model))
            else:
                _, stages[cached] = _stage(*args)
        logged[cached] = [m for m in caplog.messages if "truncated" in m]
    if what:
        assert logged["true"] == logged["false"] and len(logged["true"]) == 1
        assert f" {what} truncated (data.max_prompt_len=12, " in logged["true"][0]
    prepared, memory = stages["true"], stages["false"]
    if what is None:
        assert len(list(tmp_path.glob("prompts-*/meta.json"))) == 1
        assert prepared.prompts == memory.prompts and len(prepared.prompts) == 24
        return
    table = prepared.pairs if what == "pairs" else prepared.examples
    assert isinstance(table, TokenTable) and len(list(tmp_path.glob("*/meta.json"))) == 1
    in_memory = memory.pairs if what == "pairs" else memory.examples
    assert table.gather(range(len(table))) == in_memory.gather(range(len(in_memory)))
    for _ in range(3):
        assert prepared.source.next() == memory.source.next()
