"""run.eval_after in the recipes: on in the GPU recipes, short under debug=cpu, and the eval
run it makes names enough items for every task."""

from __future__ import annotations

import pytest

from orchestrator.config.compose import compose
from orchestrator.config.evaluation import check_eval_stage
from orchestrator.evals.after import eval_config


@pytest.mark.parametrize(
    "recipe, debug, items, tasks",
    [
        ("grpo_math", False, 500, [("generation", "hf:openai/gsm8k")]),
        ("grpo_math", True, 100, [("nll", None), ("generation", None)]),
        ("sft_dpo_grpo_math", True, 100, [("nll", None), ("generation", None)]),
        ("moe_experts", True, 100, []),
    ],
)
def test_recipes_evaluate_after_training(recipe, debug, items, tasks, tmp_path):
    cfg, _ = compose([f"+experiment={recipe}", *(["debug=cpu"] if debug else []), f"run.output_dir={tmp_path}"])
    assert cfg.run.eval_after
    ecfg = eval_config(cfg, tmp_path)
    check_eval_stage(ecfg)
    assert ecfg.eval.items == items and [(str(t.kind), t.source) for t in ecfg.eval.tasks] == tasks
    assert ecfg.eval.candidate == str(tmp_path) and ecfg.run.output_dir == str(tmp_path / "eval")
    assert not ecfg.run.eval_after
