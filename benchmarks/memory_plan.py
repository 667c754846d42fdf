"""Predicted (orchestrator.plan) vs measured memory of one training step on CPU.

python -m benchmarks.memory_plan              # prints the table
python -m benchmarks.memory_plan --write      # also rewrites docs/memory_plan.md

A mid-size Llama (~25M parameters, built locally, fp32) trains one step on one worker with
the project's own model build (`Method.build`), AdamW (`build_optimizer`) and loss
(`nll_sum`), full and LoRA, with and without activation checkpointing. Measured:

- model state: bytes of the distinct storages of parameters, gradients and optimizer state
  after the first step (what the plan calls parameters + gradients + optimizer state);
- activations: bytes of the tensors autograd saves for backward in the second step's forward;
- peak: the largest sum of live tensor bytes during the second step, counted by a
  TorchDispatchMode that registers every op's outputs and drops them when their storage
  is freed (CPU has no `max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from orchestrator.config.compose import compose
from orchestrator.engines.optim import build_optimizer
from orchestrator.methods import METHODS
from orchestrator.models.logprobs import nll_sum
from orchestrator.plan import estimate
from orchestrator.plan.memory import Layout, activation_bytes, lora_dropout_elements, merged_experts_bytes
from orchestrator.plan.shapes import shapes

COMMON = ["plan.device=cpu", "cluster.num_workers=1", "cluster.gpus_per_worker=0", "backend.mixed_precision=fp32"]
MODELS = {
    # A mid-size Llama: hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1376 (~23M parameters).
    "llama": [
        "model=tiny_llama",
        "model.hidden_size=512",
        "model.intermediate_size=1376",
        "model.num_layers=8",
        "model.num_heads=8",
        "model.num_kv_heads=4",
    ],
    # tiny_moe scaled up: Qwen3-MoE, hidden 384, 6 layers, 8 experts of width 384 (top-2), ~24M
    # parameters; the experts method trains experts 0-3 of every layer.
    "moe": [
        "model=tiny_moe",
        "model.hidden_size=384",
        "model.moe_intermediate_size=384",
        "model.intermediate_size=768",
        "model.num_layers=6",
        "model.num_heads=6",
        "model.num_kv_heads=2",
        "method.experts=[0,1,2,3]",
    ],
}
SEQ, MICRO_BATCH = 256, 4
STATE = ("parameters", "gathered parameters", "gradients", "optimizer state")


class LiveBytes(TorchDispatchMode):
    """Peak of the summed sizes of live storages created or registered while active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s.data_ptr()
        if key in self.live and not self.live[key][0].expired():
            return
        self.live[key] = (StorageWeakRef(s), s.nbytes())
        self.now += s.nbytes()
        self.peak = max(self.peak, self.now)

    def sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.add(t)
        return out


def _storages_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(
    method: str,
    checkpointing: bool,
    seq: int = SEQ,
    micro_batch: int = MICRO_BATCH,
    peak: bool = True,
    model: str = "llama",
) -> dict:
    """Predicted and measured bytes of one case (`peak=False`: no live-bytes count of the second step)."""
    overrides = [*COMMON, f"method={method}", *MODELS[model]]
    overrides.append(f"backend.activation_checkpointing={str(checkpointing).lower()}")
    cfg, _ = compose(overrides)
    cfg.data.max_seq_len = seq
    sh = shapes(cfg.model, cfg.method)
    p = estimate(cfg, sh, Layout(1, micro_batch, checkpointing))
    predicted_state = sum(c.bytes for c in p.components if c.name in STATE)
    tokens = micro_batch * seq
    # What forward keeps (with checkpointing each layer's input; the recomputed layer comes in
    # backward), plus the one fp32 log-softmax chunk the plan counts under "logits + loss".
    drop = lora_dropout_elements(cfg.method, sh)
    predicted_act = activation_bytes(sh, tokens, seq, 4, checkpointing, False, drop, 4, recomputed=False)
    predicted_act += min(tokens * sh.vocab * 4, cfg.train.logits_chunk_mb * 2**20)
    if not checkpointing:  # under checkpointing the one merged layer comes in backward
        predicted_act += merged_experts_bytes(cfg, sh, False)
    predicted_peak = sum(c.bytes for c in p.components)

    torch.manual_seed(0)
    model_name, model = model, METHODS[method](cfg.method).build(cfg.model, torch.float32, seed=0)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = build_optimizer(model, cfg.train, fused=False)
    ids = torch.randint(5, model.config.vocab_size, (micro_batch, seq))
    mb = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq).expand(micro_batch, seq)}

    saved: dict[int, int] = {}
    weights = {q.untyped_storage().data_ptr() for q in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # weights (and their views) are not activations
            saved[s.data_ptr()] = s.nbytes()
        return t

    def step(hooks: bool) -> None:
        opt.zero_grad(set_to_none=True)  # as the engines do
        with torch.autograd.graph.saved_tensors_hooks(pack if hooks else (lambda t: t), lambda t: t):
            loss = nll_sum(model, mb, cfg.train.logits_chunk_mb, -100) / ids.numel()
        loss.backward()
        opt.step()

    step(False)  # the first step creates the optimizer state; the second is the steady state
    params = list(model.parameters())
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()]
    measured_state = _storages_bytes(params + [q.grad for q in params if q.grad is not None] + state)
    mode = LiveBytes()
    with mode if peak else contextlib.nullcontext():
        for t in params + state if peak else []:
            mode.add(t)
        step(True)
    return {
        "case": f"{method}{' (MoE)' if model_name == 'moe' else ''}, checkpointing {'on' if checkpointing else 'off'}",
        "params": p.params,
        "trainable": p.trainable,
        "state_pred": predicted_state,
        "state_meas": measured_state,
        "act_pred": predicted_act,
        "act_meas": sum(saved.values()),
        "peak_pred": predicted_peak,
        "peak_meas": mode.peak,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _err(pred: int, meas: int) -> str:
    return f"{(pred - meas) / meas:+.1%}"


def table(rows: list[dict]) -> str:
    head = (
        "| case | params | trainable | model state pred / meas (MiB) | err | activations pred / meas (MiB) "
        "| err | peak pred / meas (MiB) | err |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params']:,} | {r['trainable']:,} | {_mib(r['state_pred'])} / {_mib(r['state_meas'])} "
            f"| {_err(r['state_pred'], r['state_meas'])} | {_mib(r['act_pred'])} / {_mib(r['act_meas'])} "
            f"| {_err(r['act_pred'], r['act_meas'])} | {_mib(r['peak_pred'])} / {_mib(r['peak_meas'])} "
            f"| {_err(r['peak_pred'], r['peak_meas'])} |"
        )
    return "\n".join(lines)


CASES = [
    ("llama", "full", False),
    ("llama", "full", True),
    ("llama", "lora", False),
    ("llama", "lora", True),
    ("moe", "experts", False),
    ("moe", "experts", True),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite docs/memory_plan.md")
    args = ap.parse_args(argv)
    rows = [measure(m, c, model=model) for model, m, c in CASES]
    text = table(rows)
    print(text)
    if args.write:
        doc = Path(__file__).resolve().parents[1] / "docs" / "memory_plan.md"
        doc.write_text(DOC.format(table=text, seq=SEQ, mb=MICRO_BATCH))
        print(f"wrote {doc}")
    return 0


DOC = """# Memory plan: predicted vs measured

`python -m orchestrator.plan` predicts memory per device from the config alone
(orchestrator/plan/memory.py states the model). This table checks it on CPU against one
real training step (fp32; one worker; micro-batch {mb} x {seq} tokens), built and trained
with the project's own method build, AdamW and loss, of two models:

- a mid-size Llama (hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1376, byte
  vocabulary; ~23M parameters), full fine-tuning and LoRA (r 16, all linears, dropout 0.05);
- a Qwen3-MoE (`model=tiny_moe` scaled to hidden 384, 6 layers, 8 experts of width 384,
  top-2; ~24M parameters) under the experts method training experts 0-3 of every layer.

Regenerate with:

```
python -m benchmarks.memory_plan --write
```

{table}

- model state: parameters + gradients + AdamW state. Measured: the distinct storages
  after the first step. The tests (tests/plan/test_memory_measured.py) hold this within 15%.
- activations: measured as the tensors autograd saves for backward during the forward
  (saved-tensor hooks; weights excluded), predicted by the per-layer formula in
  orchestrator/plan/memory.py plus what the final norm and LM head keep after the last
  layer, and the one fp32 log-softmax chunk of the loss. With checkpointing both columns
  are what forward keeps (each layer's input and that tail); the plan adds one recomputed
  layer on top, which the peak holds. The tests hold this within 15%.
- peak: predicted = every component summed; measured = the largest sum of live tensor
  bytes during the second (steady-state) step's forward, backward and optimizer step (a
  TorchDispatchMode counting storages as ops create them and as they are freed). The sum
  counts gradients and all activations at once although backward frees activations as
  gradients appear, so it errs high: a safe margin for a go / no-go verdict. No CUDA
  context, NCCL or fragmentation headroom is counted on CPU.
"""


if __name__ == "__main__":
    sys.exit(main())
