"""PPO end to end on CPU (tiny models, real Ray workers): a critic and a frozen reward model
beside the policy, the learned reward next to a verifiable one, every trained role
checkpointed, and a killed critic worker recovered in-job with the losses of an
uninterrupted run. (What PPO learns against a trained reward model is a command with its
numbers in the README: `python -m orchestrator +experiment=rlhf_ppo debug=cpu`.)"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A reward-model directory as `stage=rm` exports it: the tiny Llama with a score head
    (random init) and the project's tokenizer, which the policy shares."""
    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("rm") / "model"
    m = ModelConfig(name="tiny_llama", init_seed=99)
    build_model(m, torch.float32, head="score").save_pretrained(out)
    build_tokenizer(m).save_pretrained(out)
    return out


def _ppo(rm_dir, *extra):
    return [
        "+experiment=rlhf_ppo",
        "debug=cpu",
        "run.init_from=null",
        f"stage.reward_model.path={rm_dir}",
        "stage.rewards=[{name:reward_model,weight:1.0},{name:format,weight:1.0,kwargs:{pattern:'[0-9]'}}]",
        "stage.prompts_per_step=4",
        "rollout.n=4",
        "train.micro_batch_size=4",
        "rollout.max_new_tokens=8",
        "eval.samples=0",
        "stage.log_samples_every=0",
        "checkpoint.export_hf=false",
        *extra,
    ]


def test_ppo_trains_policy_and_critic_against_the_reward_model(run_main, reward_model_dir):
    rc, run = run_main(
        *_ppo(
            reward_model_dir,
            "train.max_steps=3",
            "checkpoint.every_steps=3",
            "stage.kl_target=0.01",
            "stage.kl_coef=0.1",
            "stage.mini_batches=2",
            "stage.ppo_epochs=2",
            "stage.critic_warmup_steps=1",
        ),
        name="ppo",
    )
    assert rc == 0
    steps = read_metrics(run)
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        for key in ("critic/value_loss", "critic/values_mean", "reward/reward_model", "reward/format", "kl", "kl_coef"):
            assert key in m and m[key] == m[key], key
    # the first step trains only the critic (critic_warmup_steps=1): the policy stays at version 0
    assert steps[0]["policy_version"] == 0 and "loss" not in steps[0]
    assert steps[1]["policy_version"] == 1 and steps[2]["policy_version"] == 2
    # the adaptive controller moves the coefficient towards the KL target
    assert steps[-1]["kl_coef"] != 0.1
    # the critic starts from the reward model: its first values are that model's scores, not zeros
    assert abs(steps[0]["critic/values_mean"]) > 0
    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / "__0_0.distcp").is_file() and (ckpt / "critic" / "__0_0.distcp").is_file()  # policy, critic
    assert not (ckpt / "reward_model").exists()  # frozen roles are not checkpointed
    log = (run / "train.log").read_text()
    assert "critic: model tiny_llama" in log and "reward_model: model tiny_llama" in log


def test_killed_critic_worker_recovers_in_job_with_identical_losses(run_main, reward_model_dir):
    # no KL term: no frozen reference group to rebuild (the policy, critic and reward model are)
    common = _ppo(reward_model_dir, "train.max_steps=4", "checkpoint.every_steps=2", "stage.kl_coef=0")
    rc, ref = run_main(*common, name="ref")
    assert rc == 0
    rc, run = run_main(
        *common,
        "run.callbacks=[tests.helpers:KillWorkerAtStep]",
        "+extra.kill_worker_at_step=3",
        "+extra.kill_role=critic",
        name="critic_killed",
    )
    assert rc == 0
    assert json.loads((run / "summary.json").read_text())["restarts"] == 1
    assert "worker failure at step 4" in (run / "train.log").read_text()

    def last(run_dir):  # re-run steps: the last wins
        return {m["step"]: (m["loss"], m["critic/value_loss"], m["reward_mean"]) for m in read_metrics(run_dir)}

    assert last(run) == last(ref)


def test_grpo_takes_the_learned_reward_normalised_and_clipped(run_main, reward_model_dir):
    """The reward model as a reward entry of GRPO (no critic): its scores whitened over the
    step's samples and clipped to [-1, 1] are the whole reward."""
    rc, run = run_main(
        "+experiment=grpo_math",
        "debug=cpu",
        "run.init_from=null",
        "stage.rewards=[{name:reward_model}]",
        f"stage.reward_model.path={reward_model_dir}",
        "stage.reward_model.normalize=true",
        "stage.reward_model.clip=1.0",
        "stage.prompts_per_step=4",
        "rollout.n=4",
        "eval.samples=0",
        "train.max_steps=2",
        "checkpoint.every_steps=0",
        "checkpoint.export_hf=false",
        name="grpo_rm",
    )
    assert rc == 0
    steps = read_metrics(run)
    assert len(steps) == 2 and "critic/value_loss" not in steps[0]
    for m in steps:
        assert m["reward/reward_model_std"] > 0  # raw scores differ between samples
        assert abs(m["reward_mean"]) < 0.5 and 0 < m["reward_std"] <= 1.0 + 1e-6  # whitened, then clipped


def test_reward_model_path_errors_are_one_line(run_main, tmp_path, capsys):
    rc, _ = run_main(*_ppo(tmp_path / "missing", "train.max_steps=1"), name="bad")
    assert rc != 0
    err = capsys.readouterr().err
    assert "stage.reward_model.path" in err and "no model there" in err
