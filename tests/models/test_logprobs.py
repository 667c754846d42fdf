"""Token log-probs in chunks equal the plain full-logits path (values and gradients), and
the one-chunk path is exactly the historical formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.schema import ModelConfig
from orchestrator.data.chat import IGNORE
from orchestrator.models import build_model
from orchestrator.models.logprobs import chunk_tokens, nll_sum, token_logprobs

TINY = ModelConfig(name="t", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[2, 10:] = IGNORE
    return {"input_ids": ids, "position_ids": torch.arange(17).repeat(3, 1), "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def model():
    return build_model(TINY, torch.float32)


def test_budget_sets_the_chunk_size(model):
    vocab = model.get_output_embeddings().weight.shape[0]
    assert chunk_tokens(model, 1) == (1 << 20) // (4 * vocab)
    assert chunk_tokens(model, 256) > 3 * 16  # the test batch fits one chunk at the default


def test_chunked_logprobs_and_entropy_equal_the_plain_path(model, monkeypatch):
    mb = _batch()
    plain, plain_ent = token_logprobs(model, mb, 256, with_entropy=True)
    plain.sum().backward()
    want = _grads(model)
    model.zero_grad()
    # Force chunks of 5 tokens (51 targets -> 11 chunks, the last one short).
    monkeypatch.setattr("orchestrator.models.logprobs.chunk_tokens", lambda m, b: 5)
    chunked, ent = token_logprobs(model, mb, 256, with_entropy=True)
    chunked.sum().backward()
    got = _grads(model)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, plain_ent, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # The head is back to its own forward afterwards.
    assert "forward" not in vars(model.get_output_embeddings())


def test_one_chunk_is_the_historical_formula_and_nll_matches_chunks(model, monkeypatch):
    mb = _batch(1)
    logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
    old = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    new, _ = token_logprobs(model, mb, 256)
    assert torch.equal(new, old)
    old_nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    assert torch.equal(nll_sum(model, mb, 256, IGNORE), old_nll)
    monkeypatch.setattr("orchestrator.models.logprobs.chunk_tokens", lambda m, b: 7)
    torch.testing.assert_close(nll_sum(model, mb, 256, IGNORE), old_nll, rtol=1e-5, atol=1e-4)


def test_chunked_path_under_lora(model, monkeypatch):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    mb = _batch(2)
    plain, _ = token_logprobs(peft_model, mb, 256)
    monkeypatch.setattr("orchestrator.models.logprobs.chunk_tokens", lambda m, b: 4)
    chunked, _ = token_logprobs(peft_model, mb, 256)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
