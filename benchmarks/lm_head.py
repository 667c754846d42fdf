"""Peak memory of the LM-head loss: full logits vs the chunked path (CPU), and Liger's
fused linear cross-entropy (`train.kernels=liger`, CUDA only).

python -m benchmarks.lm_head                  # CPU: plain vs chunked budgets
python -m benchmarks.lm_head --tokens 4096    # more tokens per micro-batch

One forward and backward of `token_logprobs` (the function every objective uses) through a
one-layer Llama with a Qwen2.5-sized vocabulary (151,936), fp32. Measured: the peak of live
tensor bytes during the step, counted on CPU by `benchmarks.memory_plan.LiveBytes` (CPU has
no `max_memory_allocated`), on CUDA by `torch.cuda.max_memory_allocated`, each minus the
bytes live before the step (weights, inputs). The fused row appears only where CUDA and
`liger-kernel` are present; it has not been measured without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.memory_plan import LiveBytes
from orchestrator.models.kernels import mark_fused_ce
from orchestrator.models.logprobs import token_logprobs

VOCAB, HIDDEN = 151_936, 256


def _model(device: torch.device) -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device)


def _step(model: torch.nn.Module, mb: dict, budget_mb: int) -> None:
    logp, _ = token_logprobs(model, mb, budget_mb)
    logp.sum().backward()


def measure(path: str, budget_mb: int, tokens: int, device: torch.device) -> dict:
    model = _model(device)
    if path == "fused":
        mark_fused_ce(model)
    rows = 4
    ids = torch.randint(5, VOCAB, (rows, tokens // rows), device=device)
    mb = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1], device=device).expand_as(ids)}
    _step(model, mb, budget_mb)  # allocate the gradients once: the steady state is measured
    model.zero_grad(set_to_none=False)
    t = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(model, mb, budget_mb)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        mode = LiveBytes()
        with mode:
            for p in model.parameters():
                mode.add(p)
                mode.add(p.grad)
            for v in mb.values():
                mode.add(v)
            base = mode.now
            _step(model, mb, budget_mb)
        peak = mode.peak - base
    return {"path": path, "budget_mb": budget_mb, "peak_mib": peak / 2**20, "s": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (4 rows)")
    args = ap.parse_args(argv)
    full_logits_mib = args.tokens * VOCAB * 4 / 2**20
    cases = [("plain", 1 << 20), ("chunked", 256), ("chunked", 64)]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        if importlib.util.find_spec("liger_kernel") is not None:
            cases.append(("fused", 256))
    print(f"{args.tokens} tokens x vocab {VOCAB}: fp32 logits alone {full_logits_mib:.0f} MiB")
    print("| device | path | logits budget (MiB) | peak above weights (MiB) | time (s) |\n|---|---|---|---|---|")
    for device in devices:
        for path, budget in cases:
            if path == "fused" and device.type != "cuda":
                continue
            r = measure(path, budget, args.tokens, device)
            budget_txt = "-" if path != "chunked" else str(budget)
            print(f"| {device.type} | {path} | {budget_txt} | {r['peak_mib']:.0f} | {r['s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
