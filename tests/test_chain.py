"""`run.init_from` chains: any number of stages, any method, debug carried to GPU recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.chain import resolve_init_from
from orchestrator.config.compose import compose
from tests.conftest import REPO, read_metrics


def _fake_launch(seen):
    def launch(sub, choices):
        seen.append(sub)
        out = Path(sub.run.output_dir) / "export" / "hf"
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return {"exports": {"model": str(out)}}

    return launch


def test_debug_shrinks_a_chained_gpu_recipe_and_lora_exports_merged(tmp_path):
    cfg, choices = compose(
        [
            "+experiment=grpo_math",
            "debug=cpu",
            "run.init_from=experiment:sft_lora",
            f"run.output_dir={tmp_path}",
            "logger=console",
        ]
    )
    seen = []
    out = resolve_init_from(cfg, choices, _fake_launch(seen))
    (sub,) = seen
    assert sub.model.name == "tiny_llama" and sub.cluster.gpus_per_worker == 0  # shrunk like the run
    assert sub.method.name == "lora" and sub.method.export_merged  # the next stage needs a whole model
    assert out.model.pretrained == str(tmp_path / "init_from_sft_lora" / "export" / "hf")
    assert out.run.init_from is None
    # A second resolution reuses the finished stage instead of running it again.
    (tmp_path / "init_from_sft_lora" / "summary.json").write_text(
        json.dumps({"exports": {"model": out.model.pretrained}})
    )
    assert resolve_init_from(cfg, choices, _fake_launch(seen)).model.pretrained == out.model.pretrained
    assert len(seen) == 1


def test_a_chained_cpu_recipe_runs_as_written_under_debug(tmp_path):
    cfg, choices = compose(["+experiment=grpo_math", "debug=cpu", f"run.output_dir={tmp_path}"])
    seen = []
    resolve_init_from(cfg, choices, _fake_launch(seen))
    (sub,) = seen
    assert sub.run.name == "sft_arith_warmup" and sub.train.max_steps == 400
    assert sub.data.source == "synthetic:arithmetic_noisy"


def test_sft_dpo_grpo_recipe_chains_dpo_then_its_sft_warmup(tmp_path):
    cfg, choices = compose(["+experiment=sft_dpo_grpo_math", "debug=cpu", f"run.output_dir={tmp_path}"])
    assert cfg.stage.name == "grpo" and cfg.run.init_from == "experiment:dpo_ultrafeedback"
    seen = []
    out = resolve_init_from(cfg, choices, _fake_launch(seen))
    (dpo,) = seen  # the DPO recipe, shrunk to CPU (as written it needs a GPU)
    assert dpo.stage.name == "dpo" and dpo.model.name == "tiny_llama" and dpo.cluster.gpus_per_worker == 0
    assert dpo.data.source == "synthetic:arithmetic_pairs"
    assert dpo.run.init_from == "experiment:sft_arith_warmup"  # resolved when the DPO run launches
    assert out.model.pretrained == str(tmp_path / "init_from_dpo_ultrafeedback" / "export" / "hf")
    # ... and that SFT warm-up runs as written (a CPU recipe).
    seen_sft = []
    resolve_init_from(dpo, {"debug": "cpu", "logger": "console"}, _fake_launch(seen_sft))
    (sft,) = seen_sft
    assert sft.stage.name == "sft" and sft.run.name == "sft_arith_warmup"


def test_rlhf_chain_runs_the_warmup_once_for_the_policy_and_its_reward_model(tmp_path):
    """`rlhf_ppo debug=cpu`: the SFT warm-up, then the reward model (which starts from the same
    warm-up: reused, not run again), and the PPO run points at both exports."""
    cfg, choices = compose(["+experiment=rlhf_ppo", "debug=cpu", f"run.output_dir={tmp_path}"])
    assert cfg.stage.reward_model.path == "experiment:rm_reviews"
    seen = []

    def launch(sub, sub_choices):  # a chained run resolves its own chain as the local launcher does
        sub = resolve_init_from(sub, sub_choices, launch)
        return _fake_launch(seen)(sub, sub_choices)

    out = resolve_init_from(cfg, choices, launch)
    assert [s.run.name for s in seen] == ["sft_review_warmup", "rm_reviews"]
    warm = str(tmp_path / "init_from_sft_review_warmup" / "export" / "hf")
    assert out.model.pretrained == warm and seen[1].model.pretrained == warm
    assert out.stage.reward_model.path == str(tmp_path / "reward_model_rm_reviews" / "export" / "hf")
    from orchestrator import chain

    assert chain._COMPLETED is None  # the reuse lasts one chain, not the process


CHAIN_A = """# @package _global_
defaults:
  - override /model: tiny_llama
  - override /method: lora
  - override /stage: sft
  - override /data: synthetic_instruct
run:
  name: chain_a
train:
  max_steps: 3
  lr: 1e-2
checkpoint:
  every_steps: 0
"""
CHAIN_B = """# @package _global_
defaults:
  - override /model: tiny_llama
  - override /method: full
  - override /stage: sft
  - override /data: arithmetic
run:
  name: chain_b
  init_from: experiment:chain_a
train:
  max_steps: 3
checkpoint:
  every_steps: 0
"""


@pytest.mark.slow
def test_three_stage_chain_lora_sft_then_full_sft_then_grpo(run_main, tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "experiment" / "chain_a.yaml").write_text(CHAIN_A)
    (conf / "experiment" / "chain_b.yaml").write_text(CHAIN_B)
    monkeypatch.setenv("ORCHESTRATOR_CONF", str(conf))
    args = [
        "+experiment=grpo_math",
        "debug=cpu",
        "run.init_from=experiment:chain_b",
        "train.max_steps=2",
        "stage.prompts_per_step=4",
        "rollout.n=4",
        "eval.samples=0",
        "checkpoint.every_steps=0",
    ]
    rc, run_dir = run_main(*args, name="grpo")
    assert rc == 0
    b = run_dir / "init_from_chain_b"
    a = b / "init_from_chain_a"
    for stage_dir in (a, b):
        assert json.loads((stage_dir / "summary.json").read_text())["steps"] == 3
    # Each stage started from the previous stage's export: LoRA merged, then full.
    assert json.loads((a / "summary.json").read_text())["exports"]["merged"]
    import yaml

    b_cfg = yaml.safe_load((b / "config.yaml").read_text())
    assert b_cfg["model"]["pretrained"].endswith("init_from_chain_a/export/merged")
    grpo_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert grpo_cfg["model"]["pretrained"].endswith("init_from_chain_b/export/hf")
    assert len(read_metrics(run_dir)) == 2
