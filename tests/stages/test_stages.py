"""Stage logic against a fake worker group (no Ray, no engine): what the driver-side
stage sends to which role, and what it makes of the results."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.models import build_tokenizer
from orchestrator.roles import REFERENCE, Roles
from orchestrator.rollout.base import Completion
from orchestrator.stages import STAGES


class FakeGroup:
    """The WorkerGroup surface a stage uses; records every call."""

    def __init__(self, world: int, name: str = "policy"):
        self.world_size, self.name, self.calls = world, name, []
        self.pg = None

    def _result(self, method: str, arg: Any) -> Any:
        if method == "train_step":
            tokens = float(sum((mb["weights"] > 0).sum() for mb in arg)) if "weights" in arg[0] else 0.0
            return {
                "nll_sum": 2.0,
                "loss_sum": 0.5,
                "clipped_tokens": 0.0,
                "entropy_sum": tokens,
                "tokens": tokens,
                "kl_sum": 0.0,
                "grad_norm": 1.0,
                "lr": 1e-3,
                "skipped": 0.0,
                "local_finite": 1.0,
            }
        if method == "forward_logprobs":
            return [torch.zeros(mb["input_ids"].shape[0], mb["input_ids"].shape[1] - 1) for mb in arg]
        if method == "inference_state":
            return {"w": torch.zeros(1)}
        raise AssertionError(method)

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        self.calls.append((method, None, kwargs))
        return [
            self._result(method, None) if r == 0 or method != "inference_state" else {} for r in range(self.world_size)
        ]

    def call_per_rank(self, method: str, per_rank, **kwargs) -> list[Any]:
        assert len(per_rank) == self.world_size
        self.calls.append((method, per_rank, kwargs))
        return [self._result(method, arg) for arg in per_rank]


class FakeRollout:
    """Completions that end in the right answer for every other sample."""

    def __init__(self, tokenizer):
        self.tok, self.version, self.synced = tokenizer, 0, []

    def generate(self, prompts, sampling, seed) -> list[Completion]:
        out = []
        for i in range(len(prompts) * sampling.n):
            text = "4" if i % 2 else "x"
            out.append(Completion(self.tok(text, add_special_tokens=False)["input_ids"], text))
        return out

    def sync(self, version: int, state: dict[str, Any]) -> dict[str, float]:
        self.version = version
        self.synced.append(version)
        return {"time/sync": 0.0}

    def sleep(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _stage(*overrides):
    cfg, _ = compose(list(overrides))
    tok = build_tokenizer(cfg.model)
    return cfg, STAGES[cfg.stage.name](cfg, tok), tok


def test_sft_step_splits_the_global_batch_over_ranks_and_reports_the_mean_loss():
    cfg, stage, _ = _stage(
        "+experiment=sft_tiny", "cluster.num_workers=2", "train.global_batch_size=8", "train.micro_batch_size=2"
    )
    assert list(stage.roles()) == ["policy"] and stage.roles()["policy"].trainable
    group = FakeGroup(2)
    metrics = stage.step(Roles(groups={"policy": group}), 1)
    ((method, per_rank, _),) = group.calls
    assert method == "train_step" and [len(mbs) for mbs in per_rank] == [2, 2]
    targets = per_rank[0][0]["num_targets"]
    assert all(mb["num_targets"] == targets and mb["world_size"] == 2 for mbs in per_rank for mb in mbs)
    assert metrics["loss"] == pytest.approx(2 * 2.0 / targets)  # summed NLL over all targets of the batch
    assert stage.state_dict()["data"] != {} and metrics["grad_norm"] == 1.0


@pytest.mark.parametrize(
    "method, frozen_reference",
    [("full", True), ("lora", False), ("lora method.init_lora_weights=olora", True)],
    ids=["full", "lora", "lora-olora"],
)
def test_grpo_roles_reference_and_weight_sync(method, frozen_reference):
    cfg, stage, tok = _stage(
        "+experiment=grpo_math",
        "debug=cpu",
        "run.init_from=null",
        *f"method={method}".split(),
        "stage.kl_coef=0.1",
        "stage.prompts_per_step=4",
        "rollout.n=4",
        "eval.samples=0",
        "stage.num_iterations=2",
        "stage.rewards=[{name:exact_match}]",
    )
    roles = stage.roles()
    assert (REFERENCE in roles) is frozen_reference
    if frozen_reference:
        ref = roles[REFERENCE]
        assert not ref.trainable and ref.colocate_with == "policy" and ref.method.name == "full"
    policy = FakeGroup(2)
    groups = {"policy": policy, **({REFERENCE: FakeGroup(2, REFERENCE)} if frozen_reference else {})}
    stage.rollout = FakeRollout(tok)
    stage.prompts = [dict(p, answer="4") for p in stage.prompts]
    metrics = stage.step(Roles(groups=groups, specs=roles), 1)
    assert metrics["reward_mean"] == pytest.approx(0.5) and metrics["samples_trained"] == 16
    names = [c[0] for c in policy.calls]
    # Old log-probs on the policy, reference log-probs where the reference lives, two updates, one sync.
    assert names == ["forward_logprobs"] + (["forward_logprobs"] if not frozen_reference else []) + [
        "train_step",
        "train_step",
        "inference_state",
    ]
    if frozen_reference:
        assert [c[0] for c in groups[REFERENCE].calls] == ["forward_logprobs"]
        assert groups[REFERENCE].calls[0][2] == {}
    else:
        assert policy.calls[1][2] == {"reference": True}
    trained = policy.calls[-2][1]
    assert all("ref_logp" in mb and "old_logp" in mb for mbs in trained for mb in mbs)
    assert stage.version == 2 and stage.rollout.synced == [2] and metrics["policy_version"] == 2


@pytest.mark.parametrize("head, out_shape", [("lm", (2, 9, None)), ("score", (2, 1)), ("value", (2, 9, 1))])
def test_role_heads_build_through_the_method(head, out_shape):
    """A critic (value head) or reward model (score head) role is built by the same path."""
    from orchestrator.methods import get_method
    from orchestrator.roles import policy_spec

    cfg, _ = compose(["+experiment=sft_tiny"])
    spec = policy_spec(cfg)
    model = get_method(spec).build(spec.model, torch.float32, seed=0, head=head)
    out = model(input_ids=torch.randint(5, 200, (2, 9))).logits
    assert out.shape[: len(out_shape)] == tuple(s if s is not None else out.shape[i] for i, s in enumerate(out_shape))
