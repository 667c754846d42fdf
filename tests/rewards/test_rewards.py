"""Reward functions on correct / incorrect / malformed answers, and the runner's handling
of a reward that raises and one that hangs (counted, masked, the run goes on)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from orchestrator.errors import ConfigError
from orchestrator.rewards import exact_match, format_regex, math_verify
from orchestrator.rewards.runner import RewardRunner


@dataclass
class Spec:
    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("68", "68", 1.0),
        ("The answer is \\boxed{68}.", "68", 1.0),
        ("68<|im_end|>", "68", 1.0),
        ("67", "68", 0.0),
        ("", "68", 0.0),
        ("no idea", "68", 0.0),
        ("\\boxed{1/2}", "0.5", 1.0),
        ("3/4", "0.75", 1.0),
        ("-7", "-7", 1.0),
        ("84 + 1 = 85.", "85", 1.0),
        # A restated calculation equals the answer once evaluated, but states no result.
        ("To add 88 + 5, we combine them: 88 + 5 equals 88 + 5.", "93", 0.0),
        ("20 + 3 = 20 + 3 = ", "23", 0.0),
        ("\\boxed{9 \\times 10 + 3}", "93", 0.0),
        ("2^3", "8", 0.0),
        # A symbolic gold answer still accepts an equivalent expression.
        ("\\boxed{x + 1}", "$1 + x$", 1.0),
    ],
)
def test_math_verify(completion, answer, expected):
    assert math_verify(completion, answer) == expected


def test_exact_match_and_format():
    assert exact_match("so it is 12", "12") == 1.0 and exact_match("12 or 13", "12") == 0.0
    assert format_regex("\\boxed{3}", "3") == 1.0 and format_regex("3", "3") == 0.0
    assert format_regex(" 42<|im_end|>", "42", pattern=r"^-?\d+$") == 1.0


# User reward functions, loaded by import path in the runner's processes.
def raising_reward(completion, answer, **_):
    if completion == "boom":
        raise RuntimeError("reward exploded")
    return 1.0


def hanging_reward(completion, answer, **_):
    if completion == "hang":
        time.sleep(600)
    return 0.5


def test_runner_weights_sum_and_masks_raising_and_hanging_rewards():
    runner = RewardRunner(
        [
            Spec("exact_match", 1.0),
            Spec("tests.rewards.test_rewards:raising_reward", 0.5),
            Spec("tests.rewards.test_rewards:hanging_reward", 0.1),
        ],
        timeout_s=3,
        num_workers=2,
    )
    try:
        t = time.time()
        totals, valid, stats = runner.score(["7", "boom", "hang", "8"], ["7", "7", "7", "7"])
        assert time.time() - t < 30
        assert valid == [True, False, False, True]
        assert totals[0] == pytest.approx(1.0 + 0.5 + 0.05) and totals[3] == pytest.approx(0.5 + 0.05)
        assert stats["reward_errors"] == 1 and stats["reward_timeouts"] == 1
        # The pool was rebuilt after the hang: the next batch scores normally.
        totals, valid, stats = runner.score(["5"], ["5"])
        assert valid == [True] and stats["reward_timeouts"] == 0
    finally:
        runner.close()


def test_unknown_reward_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot load reward 'nope'"):
        RewardRunner([Spec("nope")], timeout_s=1, num_workers=1)


def test_hanging_calls_count_once_per_sample_and_queued_calls_still_score():
    """16 hanging calls among 20 samples and two reward functions: 16 timeouts (not every
    call that was queued behind a hung one), and the other samples are scored."""
    completions = ["hang"] * 16 + ["7", "8", "7", "x"]
    runner = RewardRunner(
        [Spec("exact_match", 1.0), Spec("tests.rewards.test_rewards:hanging_reward", 0.1)], timeout_s=1, num_workers=4
    )
    try:
        t = time.time()
        totals, valid, stats = runner.score(completions, ["7"] * 20)
        assert time.time() - t < 60
        assert stats["reward_timeouts"] == 16 and stats["reward_errors"] == 0 and "reward_unscored" not in stats
        assert valid == [False] * 16 + [True] * 4
        assert totals[16:] == pytest.approx([1.05, 0.05, 1.05, 0.05])
    finally:
        runner.close()


def test_calls_still_queued_after_the_last_round_are_unscored(monkeypatch):
    monkeypatch.setattr("orchestrator.rewards.runner.MAX_ROUNDS", 0)  # no second run
    runner = RewardRunner([Spec("tests.rewards.test_rewards:hanging_reward")], timeout_s=1, num_workers=1)
    try:
        _, valid, stats = runner.score(["hang", "7"], ["7", "7"])
        assert valid == [False, False]
        assert stats["reward_timeouts"] == 1 and stats["reward_unscored"] == 1
    finally:
        runner.close()
