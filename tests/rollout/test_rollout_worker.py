"""The rollout-engine protocol on the `hf` engine, through the rollout worker: weights arrive
under Hugging Face names and change generation, the version is tracked, sampling is
reproducible per seed, log-probs come back when asked, and top-k is honoured."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.data.chat import encode_prompt
from orchestrator.models import build_tokenizer
from orchestrator.rollout import ROLLOUT_ENGINES
from orchestrator.rollout.base import SamplingParams
from orchestrator.rollout.worker import RolloutWorker


def test_update_weights_changes_generation_and_version():
    cfg, _ = compose(["+experiment=grpo_math", "debug=cpu", "run.init_from=null"])
    tok = build_tokenizer(cfg.model)
    worker = RolloutWorker(cfg.rollout, cfg.model, 0, tok)
    assert type(worker.engine) is ROLLOUT_ENGINES["hf"]()
    prompt = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "What is 1 + 2?"}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=6)
    before = worker.generate([prompt], greedy, seed=0)
    assert before["version"] == 0 and len(before["completions"]) == 1
    # New weights under the plain model's names: push the output head towards token "7".
    head = worker.engine.model.state_dict()["lm_head.weight"].clone()
    seven = tok.convert_tokens_to_ids("7")
    head[seven] += 50.0
    worker.update_weights(3, {"lm_head.weight": head})
    after = worker.generate([prompt], greedy, seed=0)
    assert after["version"] == 3
    assert after["completions"][0]["token_ids"][0] == seven
    assert after["completions"][0]["text"].startswith("7")
    # Sampling with a fixed seed is reproducible (resume relies on it); log-probs on request.
    sample = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, logprobs=True)
    a, b = worker.generate([prompt], sample, seed=11), worker.generate([prompt], sample, seed=11)
    assert a["completions"] == b["completions"] and len(a["completions"]) == 4
    for c in a["completions"]:
        assert len(c["logprobs"]) == len(c["token_ids"]) and all(lp <= 0 and math.isfinite(lp) for lp in c["logprobs"])


def test_weights_under_training_names_are_refused():
    cfg, _ = compose(["+experiment=grpo_math", "debug=cpu", "run.init_from=null"])
    worker = RolloutWorker(cfg.rollout, cfg.model, 0, build_tokenizer(cfg.model))
    bad = {"base_model.model.lm_head.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="Hugging Face names"):
        worker.update_weights(1, bad)
    assert worker.version == 0


def test_top_k_one_samples_the_greedy_tokens():
    cfg, _ = compose(["+experiment=grpo_math", "debug=cpu", "run.init_from=null"])
    tok = build_tokenizer(cfg.model)
    worker = RolloutWorker(cfg.rollout, cfg.model, 0, tok)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 1 + 2?", "hi")]
    greedy = worker.generate(prompts, SamplingParams(n=3, temperature=0.0, max_new_tokens=8), seed=0)
    top1 = SamplingParams(n=3, temperature=1.0, top_k=1, max_new_tokens=8, logprobs=True)
    sampled = worker.generate(prompts, top1, seed=4)
    ids = [c["token_ids"] for c in sampled["completions"]]
    assert ids == [c["token_ids"] for c in greedy["completions"]]
    # Log-probs are under the distribution sampled from: top-1 leaves the greedy token all the mass.
    assert all(lp == pytest.approx(0.0, abs=1e-6) for c in sampled["completions"] for lp in c["logprobs"])
    # Off (0, and -1 as vLLM also reads it): plain sampling, which departs from greedy here.
    for off in (0, -1):
        free = worker.generate(prompts, SamplingParams(n=3, temperature=1.0, top_k=off, max_new_tokens=8), seed=4)
        assert [c["token_ids"] for c in free["completions"]] != ids
