"""GPU harness, one H100/H200: MFU, tokens/s and peak memory, ours vs TRL.

NOT YET RUN on a GPU: the numbers in benchmarks/results/ are CPU numbers until a
`gpu.json` appears there. Without CUDA, `python -m benchmarks --gpu` writes nothing and
says so; `--gpu --smoke` runs the same code path on CPU with a tiny model (the CI smoke
test does this to keep the harness from rotting; those numbers mean nothing).

* `gpu_sft_0_5b` / `gpu_sft_1_5b`: full SFT of a Qwen2.5-0.5B / 1.5B-shaped model (random
  init from a `Qwen2Config`, saved once to a local directory and loaded by both sides as
  `model.pretrained`), seq 4096, fp32 master weights with bf16 compute (our FSDP2 mixed
  precision; TRL's bf16 autocast), FSDP2 on one GPU, 4 rows of 4096 tokens per optimizer
  step in micro-batches of 1. The 1.5B runs with activation checkpointing on both sides,
  so that both contenders fit on one 80 GB GPU at once.
* `gpu_lora_7b`: LoRA r=16 on every linear layer of a Qwen2.5-7B-shaped model stored in
  bf16, seq 4096, activation checkpointing on both sides; tokens/s and peak memory.
* `gpu_grpo`: GRPO on the 0.5B shape, 8 prompts x 8 samples, completions fixed at 256
  tokens, HF `generate` on both sides (ours: a colocated RolloutWorker in bf16).

MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s (989 TFLOP/s for
H100/H200 SXM), with model FLOPs per token = 6 N + 12 L H Q S (N: parameters of every
matmul, LM head included; L layers, H heads, Q head dim, S sequence length), the
convention of torchtitan and PaLM (attention counted in full, though causal kernels skip
about half of it). Peak memory is `torch.cuda.max_memory_allocated` in each contender's
process.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

from benchmarks import grpo, sft
from benchmarks.common import compose_cfg, sft_overrides, write_long_rows
from benchmarks.harness import gpu_info, interleave, result, time_ratio

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    # --smoke on a machine without CUDA: the code path only.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 512,
        "tie_word_embeddings": True,
    },
}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def _has_cuda() -> bool:
    return bool(gpu_info())


def _save_model(shape: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from orchestrator.models.tokenizer import byte_tokenizer

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is fast on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)  # ids < 261: valid in any of these vocabularies


def prepare_model(shape: str, cache: Path, cuda: bool) -> Path:
    """A random-init model of `shape` on disk. On GPU it is built in a child process: this
    one forks the CPU contenders, so it must never initialise CUDA."""
    out = cache / shape
    if not (out / "config.json").exists():
        if not cuda:
            _save_model(shape, str(out))
        else:
            with mp.get_context("spawn").Pool(1) as pool:
                pool.apply(_save_model, (shape, str(out)))
    return out


def matmul_params(c: dict[str, Any]) -> int:
    d, f, L, h, kv, V = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["vocab_size"],
    )
    q = d // h
    attn = d * h * q + 2 * d * kv * q + h * q * d
    return L * (attn + 3 * d * f) + d * V


def flops_per_token(c: dict[str, Any], seq: int) -> float:
    q = c["hidden_size"] // c["num_attention_heads"]
    return 6 * matmul_params(c) + 12 * c["num_hidden_layers"] * c["num_attention_heads"] * q * seq


def _peak(gpu_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)


def _model_overrides(path: Path, shape: str, dtype: str):
    return [
        "model=qwen2_5_0_5b",
        f"model.name={shape}-shaped",
        f"model.pretrained={path}",
        "model.tokenizer=null",
        f"model.dtype={dtype}",
        "model.chat_template=null",
    ]


def _start(smoke: bool):
    cuda = _has_cuda()
    if smoke and not cuda:
        return False, "fork", ["cluster.gpus_per_worker=0"]
    return True, "spawn", ["cluster.gpus_per_worker=1", "backend.mixed_precision=bf16"]


def _sft(
    work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool, shape: str, lora: bool, ckpt: bool
) -> dict[str, Any]:
    cuda, start, device = _start(smoke)
    shape = shape if cuda else "tiny"
    seq, batch, micro = (4096, 4, 1) if cuda else (64, 2, 1)
    path = prepare_model(shape, work_dir / "models", cuda)
    data = write_long_rows(work_dir / "rows.jsonl", n=batch * (warmup + repeats + 2), seq=seq)
    extra = [*device, f"backend.activation_checkpointing={str(ckpt).lower()}"]
    if lora:
        extra += [
            "method=lora",
            "method.r=16",
            "method.alpha=32",
            "method.dropout=0.0",
            "method.target_modules=[all-linear]",
        ]
    model = _model_overrides(path, shape, "bfloat16" if lora else "float32")
    cfg = compose_cfg(sft_overrides(data, seq, batch, model, work_dir, threads, extra, micro=micro))
    peer = "trl_peft" if lora else "trl"
    res = interleave(
        {"ours": (sft.ours, {"cfg": cfg}), peer: (sft.trl, {"cfg": cfg, "lora": lora})},
        warmup,
        repeats,
        threads,
        start_method=start,
    )
    out = {name: result(r) for name, r in res.items()}
    tokens = seq * batch
    shape_cfg = SHAPES[shape]
    peak = _peak(gpu_info().get("gpu", "")) if cuda else None
    for c in out.values():
        c["tokens_per_s"] = round(tokens / c["median_s"], 1)
        if peak and not lora:
            c["mfu"] = round(flops_per_token(shape_cfg, seq) * tokens / c["median_s"] / peak, 4)
    return {
        "title": f"{'LoRA' if lora else 'Full SFT'}, {shape}-shaped, seq {seq}",
        "unit": "s/step",
        "work": {
            "shape": shape,
            "seq": seq,
            "rows_per_step": batch,
            "micro_batch": micro,
            "tokens_per_step": tokens,
            "matmul_params": matmul_params(shape_cfg),
            "flops_per_token": flops_per_token(shape_cfg, seq),
            "peak_flops": peak,
            "activation_checkpointing": ckpt,
            "on_gpu": cuda,
            **({"lora_r": 16} if lora else {}),
        },
        "contenders": out,
        "ratios": [time_ratio(f"ours/{peer}", out, "ours", peer, None)],
    }


def gpu_sft_0_5b(work_dir: Path, **kw) -> dict[str, Any]:
    return _sft(work_dir, shape="qwen2.5-0.5b", lora=False, ckpt=False, **kw)


def gpu_sft_1_5b(work_dir: Path, **kw) -> dict[str, Any]:
    return _sft(work_dir, shape="qwen2.5-1.5b", lora=False, ckpt=True, **kw)


def gpu_lora_7b(work_dir: Path, **kw) -> dict[str, Any]:
    return _sft(work_dir, shape="qwen2.5-7b", lora=True, ckpt=True, **kw)


def gpu_grpo(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    cuda, start, device = _start(smoke)
    shape = "qwen2.5-0.5b" if cuda else "tiny"
    w = (
        {"prompts": 8, "n": 8, "completion": 256, "micro": 16}
        if cuda
        else {"prompts": 2, "n": 4, "completion": 4, "micro": 8}
    )
    path = prepare_model(shape, work_dir / "models", cuda)
    rollout = ["rollout.gpus_per_worker=0.25", "rollout.placement=colocated"] if cuda else []
    cfg = grpo.grpo_cfg(
        work_dir,
        w,
        warmup + repeats + 2,
        threads,
        model=_model_overrides(path, shape, "float32"),
        extra=[*device, *rollout],
    )
    out = grpo.run_grpo(cfg, w, warmup, repeats, threads, start_method=start)
    samples = w["prompts"] * w["n"]
    for c in out.values():
        c["samples_per_s"] = round(samples / c["median_s"], 2)
        c["completion_tokens_per_s"] = round(samples * w["completion"] / c["median_s"], 1)
    return {
        "title": f"GRPO iteration, {shape}-shaped",
        "unit": "s/iteration",
        "work": {"shape": shape, **w, "samples_per_iteration": samples, "on_gpu": cuda},
        "contenders": out,
        "ratios": [time_ratio("ours/trl", out, "ours", "trl", None)],
    }


SUITE = {"gpu_sft_0_5b": gpu_sft_0_5b, "gpu_sft_1_5b": gpu_sft_1_5b, "gpu_lora_7b": gpu_lora_7b, "gpu_grpo": gpu_grpo}
