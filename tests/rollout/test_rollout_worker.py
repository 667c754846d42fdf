"""The rollout worker's weight sync: after update_weights, generation uses the new weights."""

from __future__ import annotations

import torch

from orchestrator.config.compose import compose
from orchestrator.models import build_tokenizer
from orchestrator.rollout.worker import RolloutWorker


def test_update_weights_changes_generation_and_version():
    cfg, _ = compose(["+experiment=grpo_math", "debug=cpu", "method=lora_rl", "run.init_from=null"])
    tok = build_tokenizer(cfg.model)
    worker = RolloutWorker(cfg, 0, tok)
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    greedy = {"temperature": 0, "top_p": 1.0, "max_new_tokens": 6, "stop": []}
    before = worker.generate([prompt], 1, greedy, seed=0)
    assert before["version"] == 0 and len(before["completions"]) == 1
    # New weights: push the output head towards token "7" (a trained adapter would do the same).
    state = {k: v.clone() for k, v in worker.model.state_dict().items() if "lora_B" in k}
    assert state, "LoRA adapter weights are what weight sync sends"
    head = [k for k in worker.model.state_dict() if k.endswith("lm_head.weight")][0]
    full_head = worker.model.state_dict()[head].clone()
    seven = tok.convert_tokens_to_ids("7")
    full_head[seven] += 50.0
    worker.update_weights(3, {head: full_head})
    after = worker.generate([prompt], 1, greedy, seed=0)
    assert after["version"] == 3
    assert after["completions"] != before["completions"]
    assert after["completions"][0][0] == seven
    # Sampling with a fixed seed is reproducible (resume relies on it).
    sample = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "stop": []}
    assert worker.generate([prompt], 4, sample, seed=11)["completions"] == \
        worker.generate([prompt], 4, sample, seed=11)["completions"]
    torch.manual_seed(0)
