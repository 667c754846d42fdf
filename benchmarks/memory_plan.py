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
import queue
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
# What a sharded rank holds between backward and the update (the gathered working set is freed).
RESIDENT = ("parameters", "gradients", "optimizer state", "reduce bucket")


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


def _resident_bytes() -> int:
    """Bytes of the distinct storages of every live CPU tensor (a DTensor by its local shard):
    what a rank keeps between steps."""
    import gc

    from torch.distributed.tensor import DTensor

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = obj._local_tensor if isinstance(obj, DTensor) else obj
        if t.device.type != "cpu" or t.is_meta:
            continue
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper without storage of its own
            continue
        if st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _engine_rank(rank: int, world: int, port: int, overrides: list[str], seq: int, micro_batch: int, out) -> None:
    """One rank of `measure_engine`: the run's engine on a gloo group, two SFT steps."""
    from datetime import timedelta

    import torch.distributed as dist

    from orchestrator.engines import get_engine_class
    from orchestrator.roles import policy_spec
    from orchestrator.stages.sft import SftStage

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    cfg, _ = compose(overrides)
    cfg.data.max_seq_len = seq
    torch.manual_seed(rank)
    spec = policy_spec(cfg, loss=SftStage.loss)
    engine = get_engine_class(cfg.backend.name)(spec, rank, world, torch.device("cpu"), 10)
    ids = torch.randint(5, 256, (micro_batch, seq))
    mb = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": torch.arange(seq).expand(micro_batch, seq),
        "num_targets": world * ids.numel(),
        "world_size": world,
        "logits_chunk_mb": cfg.train.logits_chunk_mb,
    }
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Weights are not activations: FSDP2 and ZeRO-3 save the gathered nn.Parameter itself.
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        return t

    def loss_fn(model, batch):  # the hooks see the forward only, not backward's recomputation
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return SftStage.loss(model, batch)

    engine.train_step([dict(mb)], SftStage.loss)  # the first step creates the optimizer state
    state, optimizer_step = [], engine._optimizer_step

    def counted_step():  # after backward, before the update: parameters, gradients and optimizer state
        state.append(_resident_bytes())
        return optimizer_step()

    engine._optimizer_step = counted_step
    engine.train_step([dict(mb)], loss_fn)
    out.put((rank, state[0], sum(saved.values())))
    dist.barrier()
    dist.destroy_process_group()


def measure_engine(
    backend: str,
    method: str,
    workers: int,
    checkpointing: bool,
    seq: int = SEQ,
    micro_batch: int = MICRO_BATCH,
    model: str = "llama",
) -> dict:
    """Predicted and measured bytes per rank of the run's own engine (`backend`) on `workers`
    CPU processes over gloo, in the second step (largest rank): model state as the storages
    alive between backward and the optimizer update (engines free gradients after it),
    activations as what the forward saves for backward."""
    import os
    import socket

    import torch.multiprocessing as mp

    overrides = [*COMMON, f"method={method}", *MODELS[model], f"backend={backend}"]
    overrides += [f"cluster.num_workers={workers}", f"backend.activation_checkpointing={str(checkpointing).lower()}"]
    cfg, _ = compose(overrides)
    cfg.data.max_seq_len = seq
    sh = shapes(cfg.model, cfg.method)
    p = estimate(cfg, sh, Layout(workers, micro_batch, checkpointing))
    tokens = micro_batch * seq
    drop = lora_dropout_elements(cfg.method, sh)
    act = activation_bytes(sh, tokens, seq, 4, checkpointing, False, drop, 4, recomputed=False)
    act += min(tokens * sh.vocab * 4, cfg.train.logits_chunk_mb * 2**20)
    if not checkpointing:
        act += merged_experts_bytes(cfg, sh, False)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU (inherited by the ranks)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_engine_rank, args=(r, workers, port, overrides, seq, micro_batch, out))
        for r in range(workers)
    ]
    for proc in procs:
        proc.start()
    got = []
    while len(got) < workers:  # a rank that dies (its traceback on stderr) ends the wait
        try:
            got.append(out.get(timeout=5))
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"a rank of {backend} x {workers} failed") from None
    for proc in procs:
        proc.join()
    label = {"fsdp2": "FSDP2", "deepspeed_zero3": "ZeRO-3"}[backend]
    return {
        "case": f"{method}{' (MoE)' if model == 'moe' else ''}, {label} x {workers}, "
        f"checkpointing {'on' if checkpointing else 'off'}",
        "params": p.params,
        "trainable": p.trainable,
        "state_pred": sum(c.bytes for c in p.components if c.name in RESIDENT),
        "state_meas": max(g[1] for g in got),
        "act_pred": act,
        "act_meas": max(g[2] for g in got),
        "peak_pred": None,
        "peak_meas": None,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _err(pred: int | None, meas: int | None) -> str:
    return "" if pred is None or meas is None else f"{(pred - meas) / meas:+.1%}"


def _pair(pred: int | None, meas: int | None) -> str:
    return "not measured" if pred is None or meas is None else f"{_mib(pred)} / {_mib(meas)}"


def table(rows: list[dict]) -> str:
    head = (
        "| case | params | trainable | model state pred / meas (MiB) | err | activations pred / meas (MiB) "
        "| err | peak pred / meas (MiB) | err |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params']:,} | {r['trainable']:,} | {_pair(r['state_pred'], r['state_meas'])} "
            f"| {_err(r['state_pred'], r['state_meas'])} | {_pair(r['act_pred'], r['act_meas'])} "
            f"| {_err(r['act_pred'], r['act_meas'])} | {_pair(r['peak_pred'], r['peak_meas'])} "
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

# (backend, model, method, workers, checkpointing): the run's own engine on gloo processes.
ENGINE_CASES = [
    ("fsdp2", "llama", "full", 2, False),
    ("fsdp2", "llama", "full", 2, True),
    ("fsdp2", "llama", "lora", 2, False),
    ("fsdp2", "moe", "experts", 2, False),
    ("deepspeed_zero3", "llama", "full", 2, False),
    ("deepspeed_zero3", "llama", "lora", 2, True),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite docs/memory_plan.md")
    args = ap.parse_args(argv)
    rows = [measure(m, c, model=model) for model, m, c in CASES]
    rows += [measure_engine(b, m, n, c, model=model) for b, model, m, n, c in ENGINE_CASES]
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
real training step (fp32; one worker unless the row names an engine x 2; micro-batch
{mb} x {seq} tokens), built and trained with the project's own method build, AdamW and loss, of two models:

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
- FSDP2 / ZeRO-3 x 2 rows: the run's own engine (`backend=fsdp2` / `deepspeed_zero3`, the
  SFT loss) on two CPU processes over gloo, micro-batch {mb} x {seq} per rank, the largest
  rank shown. Model state there is measured in the second step between backward and the
  optimizer update (the engines free gradients after it) as the distinct storages of every
  live tensor (a DTensor by its local shard); the plan's gathered working set is transient
  and not in it, ZeRO-3's reduce bucket (5e8 fp32 elements by default) is. Peak is not
  measured for these: the live-bytes count below is not run inside the engines.
- peak: predicted = every component summed; measured = the largest sum of live tensor
  bytes during the second (steady-state) step's forward, backward and optimizer step (a
  TorchDispatchMode counting storages as ops create them and as they are freed). The sum
  counts gradients and all activations at once although backward frees activations as
  gradients appear, so it errs high: a safe margin for a go / no-go verdict. No CUDA
  context, NCCL or fragmentation headroom is counted on CPU.
- Not measured here: bf16 mixed precision and CUDA (a run logs its plan's predicted peak
  against `torch.cuda.max_memory_allocated` after its first step: the `memory:` line and
  `memory/*_peak_gib` metrics), qlora (4-bit kernels), offloading, more than 2 ranks.
"""


if __name__ == "__main__":
    sys.exit(main())
