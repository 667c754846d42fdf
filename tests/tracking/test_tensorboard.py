"""TensorBoard event files read back with TensorBoard's own reader: every step once after a
resume and after an in-job restart (purge_step), a GRPO run's scalars and its sample
completions as text, and the run's charts in its run dir."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator

from orchestrator.config.logger import LoggerConfig, TensorBoardLoggerConfig
from orchestrator.tracking import Tracker
from tests.conftest import read_metrics


def _read(log_dir) -> EventAccumulator:
    return EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, TENSORS: 0}).Reload()


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_each_step_is_shown_once_after_a_resume_and_a_restart(tmp_path):
    cfg = SimpleNamespace(
        logger=LoggerConfig(plots=False, tensorboard=TensorBoardLoggerConfig()), run=SimpleNamespace(name="t")
    )
    first = Tracker(cfg, tmp_path, {"train": {"lr": 0.1}}, total_steps=6, start_step=0)
    for step in range(1, 6):
        first.log_step(step, {"loss": 1.0})
    first.close()  # crashed after step 5; the checkpoint is step 3
    resumed = Tracker(cfg, tmp_path, {"train": {"lr": 0.1}}, total_steps=6, start_step=3)
    for step in (4, 5):
        resumed.log_step(step, {"loss": 2.0})
    resumed.rewind(4)  # an in-job restart from the checkpoint of step 4
    for step in (5, 6):
        resumed.log_step(step, {"loss": 3.0})
    resumed.log_table("samples", ["step", "completion"], [[6, "a | b"]], 6)
    resumed.close()
    acc = _read(tmp_path / "tensorboard")
    assert _scalars(acc, "loss") == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 3.0), (6, 3.0)]
    assert [m["loss"] for m in read_metrics(tmp_path)] == [1.0, 1.0, 1.0, 2.0, 3.0, 3.0]  # the same as the file
    (text,) = acc.Tensors("samples/text_summary")
    assert (
        text.step == 6
        and text.tensor_proto.string_val[0].decode() == "| step | completion |\n|---|---|\n| 6 | a \\| b |"
    )
    assert len(acc.Tensors("config/text_summary")) == 1


@pytest.mark.slow
def test_grpo_run_writes_scalars_samples_and_rl_charts(grpo_run):
    acc = _read(grpo_run / "tensorboard")
    records = read_metrics(grpo_run)
    for key in ("loss", "reward_mean", "reward_std", "kl", "completion_len", "time/rollout", "tokens_per_s"):
        assert _scalars(acc, key) == [(m["step"], pytest.approx(m[key])) for m in records], key
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [1, 2, 3]
    table = samples[0].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| step | prompt | completion | reward | answer |" and len(table) == 2 + 4  # 4 prompts
    charts = {p.stem for p in (grpo_run / "plots").glob("*.png")}
    assert charts == {"loss", "lr", "grad_norm", "tokens_per_s", "reward", "kl", "completion_len", "eval"}
    page = (grpo_run / "plots" / "index.md").read_text()
    assert all(f"]({c}.png)" in page for c in charts)
    log = (grpo_run / "train.log").read_text()
    assert f"plots:       {grpo_run / 'plots'} (" in log and "TensorBoard: `tensorboard --logdir" in log
