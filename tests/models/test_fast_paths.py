"""GPU fast paths (docs/gpu_fast_paths.md): what runs on CPU is tested here on CPU.

* `train.compile=true` compiles every decoder block of the engine's model and trains the
  same run as eager (same per-step losses), with unchanged parameter names.
* `model.attn_implementation=auto` picks a kernel that needs no full [L, L] mask on GPU;
  packed rows through flex_attention (a block mask, which runs on CPU too) give every
  example the log-probs it gets unpacked.
* `train.kernels=liger` stops at validation, naming the key and the fix, where it cannot
  run (no liger-kernel, or CPU workers); on a GPU, Liger's fused linear cross-entropy gives
  the chunked path's log-probs and gradients (`@pytest.mark.gpu`, skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.compose import compose
from orchestrator.config.schema import (
    Fsdp2BackendConfig,
    FullMethodConfig,
    LocalClusterConfig,
    ModelConfig,
    TrainConfig,
)
from orchestrator.config.validate import validate
from orchestrator.data.batching import pack
from orchestrator.data.chat import IGNORE
from orchestrator.data.collate import pad_collate
from orchestrator.errors import ConfigError
from orchestrator.methods.full import Full
from orchestrator.roles import RoleSpec
from orchestrator.stages.sft import SftStage

_TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
TINY = ModelConfig(name="t", **_TINY_SIZES)


def _examples(n: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for length in torch.randint(8, 30, (n,), generator=g).tolist():
        ids = torch.randint(5, 250, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return examples


def _packed_micro_batch() -> dict:
    """Two packed rows of random examples, with the SFT loss's context."""
    mb = pad_collate(pack(_examples(), 64, seed=0)[:2], pad_id=0)
    targets = int((mb["labels"][:, 1:] != IGNORE).sum())
    return dict(mb, num_targets=targets, world_size=1, logits_chunk_mb=256)


def _engine(compile: bool):
    from orchestrator.engines.fsdp2 import FSDP2Engine

    spec = RoleSpec(
        name="policy",
        model=TINY,
        method=FullMethodConfig(),
        method_cls=Full,
        backend=Fsdp2BackendConfig(),
        cluster=LocalClusterConfig(),
        train=TrainConfig(lr=1e-3, compile=compile),
        loss=SftStage.loss,
        compile=compile,
    )
    return FSDP2Engine(spec, rank=0, world_size=1, device=torch.device("cpu"), total_steps=4)


def test_compiled_blocks_train_the_same_steps_as_eager():
    from orchestrator.models.kernels import decoder_blocks

    torch._dynamo.reset()
    mb = _packed_micro_batch()
    eager, compiled = _engine(compile=False), _engine(compile=True)
    blocks = decoder_blocks(compiled.model)
    assert len(blocks) == TINY.num_layers
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in decoder_blocks(eager.model))
    # In-place compile: checkpoints and the weights sent to inference keep their names.
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    want = [eager.train_step([mb], SftStage.loss) for _ in range(3)]
    got = [compiled.train_step([mb], SftStage.loss) for _ in range(3)]
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # dynamo compiled graphs, not a no-op
    for step, (w, g) in enumerate(zip(want, got)):
        assert g["nll_sum"] == pytest.approx(w["nll_sum"], rel=1e-5), step
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), step
    assert want[-1]["nll_sum"] < want[0]["nll_sum"]  # the steps trained


def test_compile_is_a_train_key_off_by_default():
    cfg, _ = compose([])
    assert cfg.train.compile is False and str(cfg.train.kernels) == "none"
    cfg, _ = compose(["train.compile=true"])
    validate(cfg)
    assert cfg.train.compile is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_liger_without_cuda_stops_at_validation_naming_key_and_fix():
    cfg, _ = compose(["train.kernels=liger"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith("train.kernels=liger cannot run: ")
    assert "pip install liger-kernel" in msg and "cluster.gpus_per_worker" in msg and "train.kernels=none" in msg
    assert msg.count("train.kernels=liger") == 1  # one message, not one per problem


def test_liger_on_a_cpu_worker_stops_at_model_build():
    """A worker that lands on CPU anyway (the config was validated elsewhere) refuses too."""
    from orchestrator.models import build_model
    from orchestrator.models.kernels import apply_liger

    with pytest.raises(ConfigError, match="train.kernels=liger needs a CUDA device, this worker runs on cpu"):
        apply_liger(build_model(TINY, torch.float32), torch.device("cpu"))


def test_auto_attention_needs_no_full_mask_on_gpu_and_keeps_sdpa_on_cpu():
    import importlib.util

    from orchestrator.models.kernels import attn_implementation

    assert str(ModelConfig(name="t").attn_implementation) == "auto"
    assert attn_implementation("auto", on_gpu=False) == "sdpa"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert attn_implementation("auto", on_gpu=True) == ("flash_attention_2" if has_flash else "flex_attention")
    # Generation reads no packed rows: no flex attention there.
    assert attn_implementation("auto", on_gpu=True, packed_rows=False) == ("flash_attention_2" if has_flash else "sdpa")
    assert attn_implementation("eager", on_gpu=True) == "eager"  # an explicit choice is kept


def _packed_equals_unpacked(model: torch.nn.Module, device: torch.device, atol: float) -> None:
    """Every example's token log-probs in packed rows equal its log-probs unpacked."""
    from orchestrator.models.logprobs import token_logprobs

    examples = _examples()
    rows = pack(examples, 64, seed=0)
    packed = pad_collate(rows, pad_id=0)
    alone = pad_collate(examples, pad_id=0)  # one example per row, right-padded
    with torch.no_grad():
        got, _ = token_logprobs(model, {k: v.to(device) for k, v in packed.items()}, 256)
        want, _ = token_logprobs(model, {k: v.to(device) for k, v in alone.items()}, 256)
    by_ids = {tuple(ex["input_ids"]): i for i, ex in enumerate(examples)}
    seen = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            i = by_ids[tuple(row["input_ids"][a:b])]
            # Targets inside the example: positions a .. b-2 predict tokens a+1 .. b-1.
            torch.testing.assert_close(got[r, a : b - 1].float(), want[i, : b - a - 1].float(), atol=atol, rtol=0)
            seen += 1
    assert seen == len(examples) and len(rows) < len(examples)  # every example, several per row


def test_packed_rows_through_flex_attention_equal_the_examples_unpacked(monkeypatch):
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.modeling_utils import AttentionInterface

    from orchestrator.models import build_model

    masks = []
    flex = AttentionInterface._global_mapping["flex_attention"]

    def recording(module, query, key, value, attention_mask, **kwargs):
        masks.append(type(attention_mask))
        return flex(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flex_attention", recording)
    model = build_model(ModelConfig(name="t", attn_implementation="flex_attention", **_TINY_SIZES), torch.float32)
    _packed_equals_unpacked(model.eval(), torch.device("cpu"), atol=2e-5)
    # The packed rows went through flex attention with a block mask, never a dense one.
    assert masks and set(masks) == {BlockMask}


def _reference_fused_linear_ce(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """What Liger's fused linear CE computes, in plain torch: a stand-in for its Triton kernel,
    which needs CUDA, so that the code around it (shapes, sign, ignored targets, entropy)
    runs here. The kernel itself is checked against the chunked path on GPU below."""
    assert reduction == "none"
    return F.cross_entropy(F.linear(x, weight, bias).float(), target, ignore_index=ignore_index, reduction="none")


def test_the_fused_ce_branch_gives_the_plain_log_probs_nll_and_entropy(monkeypatch):
    from orchestrator.models import build_model
    from orchestrator.models import logprobs as lp
    from orchestrator.models.kernels import mark_fused_ce

    mb = _packed_micro_batch()
    plain = build_model(TINY, torch.float32)
    fused = build_model(TINY, torch.float32)
    mark_fused_ce(fused)
    calls = []

    def reference(*args, **kwargs):
        calls.append(args[0].shape)
        return _reference_fused_linear_ce(*args, **kwargs)

    monkeypatch.setattr(lp, "_liger_fused_linear_ce", lambda: reference)
    want, want_ent = lp.token_logprobs(plain, mb, 256, with_entropy=True)
    monkeypatch.setattr(lp, "chunk_tokens", lambda model, budget: 7)  # the entropy in several chunks
    got, got_ent = lp.token_logprobs(fused, mb, 256, with_entropy=True)
    b, length = mb["input_ids"].shape
    assert calls == [(b * (length - 1), TINY.hidden_size)]  # one fused call over every target
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ent, want_ent, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(lp, "_liger_fused_linear_ce", lambda: reference)
    want_nll = lp.nll_sum(plain, mb, 256, IGNORE)
    got_nll = lp.nll_sum(fused, mb, 256, IGNORE)  # ignored labels (example starts, pads) add nothing
    torch.testing.assert_close(got_nll, want_nll, rtol=1e-5, atol=1e-4)
    want_nll.backward()
    got_nll.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(fused.get_output_embeddings())  # the head is its own again


# ------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_packed_rows_through_the_auto_gpu_kernel_equal_the_examples_unpacked():
    """flash_attention_2 (varlen) or flex_attention, whichever auto picks, in bf16 on CUDA."""
    from orchestrator.models import build_model

    model = build_model(ModelConfig(name="t", **_TINY_SIZES), torch.bfloat16)
    assert model.config._attn_implementation in ("flash_attention_2", "flex_attention")
    _packed_equals_unpacked(model.to("cuda").eval(), torch.device("cuda"), atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fn", ["token_logprobs", "nll_sum"])
def test_liger_fused_ce_equals_the_chunked_path(monkeypatch, fn):
    """Liger's fused linear CE (train.kernels=liger) against the chunked log-probs: values,
    entropy and gradients of every parameter, fp32, on a CUDA device (untested without one)."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    from orchestrator.models import build_model
    from orchestrator.models import logprobs as lp
    from orchestrator.models.kernels import apply_liger, uses_fused_ce

    device = torch.device("cuda")
    mb = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _packed_micro_batch().items()}
    results = {}
    for liger in (False, True):
        with monkeypatch.context() as m:
            model = build_model(TINY, torch.float32).to(device)
            if liger:
                # Liger swaps the module's RoPE function; restored when the context ends.
                m.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
                apply_liger(model, device)
                assert uses_fused_ce(model)
            else:
                m.setattr(lp, "chunk_tokens", lambda model, budget: 7)  # several chunks
            if fn == "token_logprobs":
                out, ent = lp.token_logprobs(model, mb, 256, with_entropy=True)
                (out * torch.linspace(0.5, 1.5, out.shape[-1], device=device)).sum().backward()
            else:
                out, ent = lp.nll_sum(model, mb, 256, IGNORE), None
                out.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[liger] = (out.detach(), ent, grads)
    (want, want_ent, want_g), (got, got_ent, got_g) = results[False], results[True]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if want_ent is not None:  # GRPO's entropy beside the fused log-probs
        torch.testing.assert_close(got_ent, want_ent, rtol=1e-4, atol=1e-4)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-3, atol=1e-5, msg=name)
