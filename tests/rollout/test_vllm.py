"""The `vllm` rollout engine, for real (vLLM's CPU build) in a rollout worker actor: its greedy
tokens equal `transformers`' on the same weights before and after a weight sync in Hugging
Face names (full, and a LoRA-like subset that splits vLLM's fused q/k/v layer), its
log-probs equal the trainer model's, seeded sampling repeats, top-k 1 samples the greedy
tokens, stop strings and EOS end a completion as with the `hf` engine, and weights under
training-time names are refused.

One vLLM engine serves the whole module (its start takes ~20-30 s on 2 cores); the `hf`
engine it is compared with runs in this process on the same weights.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.data.chat import encode_prompt
from orchestrator.models import build_tokenizer
from orchestrator.rollout.base import SamplingParams
from orchestrator.rollout.worker import RolloutWorker

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed: `bash scripts/install_vllm_cpu.sh` (CI's .ci/run does)",
)

BASE = ["+experiment=grpo_math", "debug=cpu", "run.init_from=null"]
QUESTIONS = ["What is 1 + 2?", "What is 13 * 7?", "Compute 120 - 45.", "hi"]
GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def tok():
    cfg, _ = compose(BASE)
    return build_tokenizer(cfg.model)


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    return [encode_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def vllm_worker(ray_cluster, tok):
    """One vLLM engine in a Ray actor (as `RolloutGroup` places it), shared by the module."""
    import ray

    cfg, _ = compose([*BASE, "rollout=vllm", "rollout.cpu_kv_cache_gib=0.25"])
    actor = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg.rollout, cfg.model, 0, tok)
    yield actor
    ray.kill(actor)


@pytest.fixture
def hf_worker(tok) -> RolloutWorker:
    """A fresh `hf` engine on the initial (seeded) weights, in this process."""
    cfg, _ = compose(BASE)
    return RolloutWorker(cfg.rollout, cfg.model, 0, tok)


def _gen(worker, prompts, sampling: SamplingParams, seed: int = 0) -> dict:
    import ray

    if isinstance(worker, RolloutWorker):
        return worker.generate(prompts, sampling, seed)
    return ray.get(worker.generate.remote(prompts, sampling, seed))


def _ids(result: dict) -> list[list[int]]:
    return [c["token_ids"] for c in result["completions"]]


def _sync(vllm_worker, hf_worker, version: int, tensors: dict[str, torch.Tensor]) -> None:
    import ray

    hf_worker.update_weights(version, tensors)
    assert ray.get(vllm_worker.update_weights.remote(version, tensors)) == version


def _perturbed(hf_worker, seed: int, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """New weights under the base model's HF names, like a trained policy's."""
    g = torch.Generator().manual_seed(seed)
    state = hf_worker.engine.model.state_dict()
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items() if keep(k)}


def test_greedy_tokens_equal_transformers_before_and_after_weight_sync(vllm_worker, hf_worker, prompts):
    import ray

    before = _gen(vllm_worker, prompts, GREEDY)
    assert _ids(before) == _ids(_gen(hf_worker, prompts, GREEDY))
    assert len(before["completions"]) == len(prompts) * GREEDY.n
    # A full-fine-tuning sync: every weight changes.
    _sync(vllm_worker, hf_worker, 1, _perturbed(hf_worker, seed=1))
    after = _gen(vllm_worker, prompts, GREEDY)
    assert after["version"] == 1
    assert _ids(after) == _ids(_gen(hf_worker, prompts, GREEDY))
    assert _ids(after) != _ids(before)  # same prompts: nothing came from the old version's cache
    # A merged-LoRA sync: only q and v projections, half of vLLM's fused qkv layer.
    lora_like = _perturbed(hf_worker, seed=2, keep=lambda k: k.endswith(("q_proj.weight", "v_proj.weight")))
    _sync(vllm_worker, hf_worker, 2, lora_like)
    # sleep / wake are no-ops on CPU (vLLM's CPU build has no sleep mode) and keep the weights.
    ray.get(vllm_worker.sleep.remote())
    ray.get(vllm_worker.wake.remote())
    partial = _gen(vllm_worker, prompts, GREEDY)
    assert partial["version"] == 2
    assert _ids(partial) == _ids(_gen(hf_worker, prompts, GREEDY))


def test_logprobs_equal_the_trainer_models(vllm_worker, hf_worker, prompts):
    import ray

    state = hf_worker.engine.model.state_dict()
    ray.get(vllm_worker.update_weights.remote(3, state))  # both engines on the same weights
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, logprobs=True)
    result = _gen(vllm_worker, prompts, sampling, seed=5)
    assert result["version"] == 3
    model = hf_worker.engine.model
    diffs = []
    for i, c in enumerate(result["completions"]):
        ids, lps = c["token_ids"], c["logprobs"]
        assert len(lps) == len(ids) > 0 and all(math.isfinite(x) and x <= 0 for x in lps)
        prompt = prompts[i // sampling.n]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        diffs.append((ref - torch.tensor(lps)).abs())
    diff = torch.cat(diffs)
    assert diff.mean().item() < 1e-3 and diff.max().item() < 1e-2, (diff.mean().item(), diff.max().item())


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(vllm_worker, prompts):
    sampling = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=12)
    a = _gen(vllm_worker, prompts, sampling, seed=11)
    assert a["completions"] == _gen(vllm_worker, prompts, sampling, seed=11)["completions"]
    assert _ids(a) != _ids(_gen(vllm_worker, prompts, sampling, seed=12))
    assert len({tuple(x) for x in _ids(a)[: sampling.n]}) > 1  # a prompt's n samples differ
    # The first prompt alone draws what it drew beside the others.
    assert _ids(_gen(vllm_worker, prompts[:1], sampling, seed=11)) == _ids(a)[: sampling.n]
    # More prompt tokens than one engine step schedules (~4k; a GRPO step easily has more).
    many = prompts * 40
    assert sum(len(p) for p in many) * 2 > 4096
    big = _gen(vllm_worker, many, SamplingParams(n=2, temperature=1.0, max_new_tokens=4), seed=3)
    assert len(big["completions"]) == 2 * len(many)


def test_top_k_one_samples_the_greedy_tokens(vllm_worker, prompts):
    top1 = SamplingParams(n=2, temperature=1.0, top_k=1, max_new_tokens=24, logprobs=True)
    sampled = _gen(vllm_worker, prompts, top1, seed=9)
    assert _ids(sampled) == _ids(_gen(vllm_worker, prompts, GREEDY))
    # Log-probs are under the distribution sampled from: top-1 leaves the greedy token all the mass.
    assert all(lp == pytest.approx(0.0, abs=1e-6) for c in sampled["completions"] for lp in c["logprobs"])


def test_stop_strings_and_eos_end_completions_as_with_hf(vllm_worker, hf_worker, tok, prompts):
    import ray

    ray.get(vllm_worker.update_weights.remote(4, hf_worker.engine.model.state_dict()))
    free = _ids(_gen(hf_worker, prompts[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=24)))[0]
    text = [tok.decode([t]) for t in free]
    # The first plain character that has not appeared before becomes the stop string.
    j = next(
        j for j in range(1, len(text)) if text[j].isalnum() and text[j].isascii() and text[j] not in "".join(text[:j])
    )
    stop = SamplingParams(n=1, temperature=0.0, max_new_tokens=24, stop=[text[j]])
    got = _gen(vllm_worker, prompts[:1], stop)["completions"][0]
    assert got["token_ids"] == free[: j + 1] == _ids(_gen(hf_worker, prompts[:1], stop))[0]
    assert got["text"].endswith(text[j])
    # A policy that always says EOS: the completion is that one token, as with hf.
    head = hf_worker.engine.model.state_dict()["lm_head.weight"].clone()
    head[tok.eos_token_id] += 100.0
    _sync(vllm_worker, hf_worker, 5, {"lm_head.weight": head})
    eos = SamplingParams(n=2, temperature=1.0, max_new_tokens=8)
    assert _ids(_gen(vllm_worker, prompts, eos)) == [[tok.eos_token_id]] * (2 * len(prompts))
    assert _ids(_gen(hf_worker, prompts, eos)) == [[tok.eos_token_id]] * (2 * len(prompts))


def test_weights_under_training_names_are_refused(vllm_worker):
    import ray

    version = ray.get(vllm_worker.update_weights.remote(7, {}))
    with pytest.raises(ray.exceptions.RayTaskError, match="Hugging Face names"):
        ray.get(vllm_worker.update_weights.remote(8, {"base_model.model.lm_head.weight": torch.zeros(1)}))
    assert version == 7
    assert ray.get(vllm_worker.generate.remote([[1, 2, 3]], GREEDY, 0))["version"] == 7
