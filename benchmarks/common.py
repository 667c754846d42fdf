"""What every benchmark shares: the config, the data, our worker run in-process, the TRL clock.

"Ours" is the code a Ray worker runs, called without Ray: a `TrainWorker` joined to a
one-rank gloo (or NCCL) process group, building its engine from the policy's role spec
(`Stage.roles()["policy"]`, as the driver builds its worker group) and stepping on
micro-batches from our data pipeline, exactly as `Stage.step` hands them over. Ray's
transport (object store, actor calls) is left out here and measured by the
time-to-first-step benchmark, which runs the real CLI.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Long rows, so that every example is cut to exactly `max_seq_len` tokens (byte tokenizer:
# one token per byte): each batch has the same shape, with no padding and no packing.
_WORDS = [
    "alpha",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "rocket",
    "garden",
    "silver",
    "window",
    "forest",
    "candle",
    "planet",
    "butter",
    "orange",
    "marble",
]


def write_long_rows(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    """`n` prompt/completion rows longer than `seq` tokens: a prompt of about seq/4 characters
    and a completion of about 2*seq, so every row is cut to `seq` with completion tokens left."""
    rng = random.Random(seed)

    def text(chars: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(max(1, chars // 6)))

    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": text(seq // 4), "completion": text(2 * seq)}) + "\n" for _ in range(n))
    return path


def compose_cfg(overrides: Sequence[str]):
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate

    cfg, _ = compose(list(overrides))
    validate(cfg)
    return cfg


def sft_overrides(
    data: Path,
    seq: int,
    batch: int,
    model: Sequence[str],
    run_dir: Path,
    threads: int,
    extra: Sequence[str] = (),
    micro: int | None = None,
) -> list[str]:
    """The SFT config every benchmark starts from: one worker, one micro-batch per step
    unless `micro` says otherwise, constant LR, logging/checkpoints/export off (they are
    not part of a step)."""
    return [
        "+experiment=sft_tiny",
        "logger=console",
        "data=jsonl",
        f"data.source={data}",
        f"data.max_seq_len={seq}",
        "data.batching=padded",
        "data.shuffle=false",
        "data.group_by_length=false",
        "data.truncate=true",
        "cluster.num_workers=1",
        f"cluster.cpus_per_worker={threads}",
        f"train.global_batch_size={batch}",
        f"train.micro_batch_size={micro or batch}",
        "train.scheduler=constant",
        "train.warmup_steps=0",
        "train.max_steps=100000",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        "checkpoint.export_hf=false",
        f"run.output_dir={run_dir}",
        *model,
        *extra,
    ]


def rollout_overrides(w: dict[str, Any], threads: int, kv_cache_gib: float, work_dir: Path) -> list[str]:
    """Overrides of a rollout benchmark's work: `w["prompts"]` prompts in file order, `w["n"]`
    samples of `w["completion"]` tokens each at temperature 1 and top-p 1, `threads` torch
    threads for the rollout worker, vLLM's CPU KV cache size."""
    return [
        f"data.num_samples={max(64, w['prompts'])}",
        "data.shuffle=false",
        f"rollout.n={w['n']}",
        f"rollout.max_new_tokens={w['completion']}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        f"rollout.cpus_per_worker={threads}",
        f"rollout.cpu_kv_cache_gib={kv_cache_gib:g}",
        f"run.output_dir={work_dir}",
    ]


def fix_vllm_length(engine, pad_id: int | None = None) -> None:
    """Every completion of a `VllmEngine` exactly `max_new_tokens` long: each request's params
    get `min_tokens = max_tokens` (EOS and the stop ids are held back) and, with `pad_id`, a
    large negative logit bias on the pad token."""
    inner = engine._params

    def fixed(sampling, seed, n):
        p = inner(sampling, seed, n)
        p.min_tokens = p.max_tokens
        if pad_id is not None:
            p.logit_bias = {pad_id: -100.0}
        return p

    engine._params = fixed


def standalone_entry(prefix: str, run: Any) -> dict[str, Any]:
    """`run(work_dir)` of a standalone benchmark command in a temporary directory: its result
    entry, with the wall time (`wall_s`) and the load average before it (`loadavg_before`)."""
    import os
    import tempfile
    import time

    load_before = os.getloadavg()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        entry = run(Path(work))
    entry["wall_s"] = round(time.perf_counter() - t, 1)
    entry["loadavg_before"] = [round(x, 2) for x in load_before]
    return entry


def policy_spec_of(stage):
    """The policy's role spec, as the stage declares it to the driver (model, method,
    backend, optimizer and the stage's loss)."""
    from orchestrator.roles import POLICY

    return stage.roles()[POLICY]


def local_worker(spec, total_steps: int = 100000):
    """A TrainWorker (the Ray actor's class, called directly) of role `spec`, on a one-rank
    process group."""
    from orchestrator.workers.train_worker import TrainWorker

    w = TrainWorker(spec, 0, 1)
    w.init_process_group("127.0.0.1", w.free_port())
    w.build(total_steps)
    return w


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


class LocalWorkers:
    """The WorkerGroup calls a stage makes (`call`, `call_per_rank`), on one in-process worker."""

    world_size = 1
    pg = None

    def __init__(self, worker):
        self.worker = worker

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def call_per_rank(self, method: str, per_rank: Sequence[Any], **kwargs) -> list[Any]:
        return [getattr(self.worker, method)(per_rank[0], **kwargs)]

    def shutdown(self) -> None:
        self.worker.shutdown()


def local_roles(spec, worker):
    """The `Roles` a stage's `step` takes: the policy's group, one in-process worker."""
    from orchestrator.roles import POLICY, Roles

    return Roles(groups={POLICY: LocalWorkers(worker)}, specs={POLICY: spec})


class LocalRollout:
    """RolloutGroup's surface (generate, sync, sleep, version) over one in-process RolloutWorker."""

    def __init__(self, worker):
        self.actors = [worker]
        self.version = 0

    def generate(self, prompts, sampling, seed: int):
        from orchestrator.rollout.base import Completion

        res = self.actors[0].generate(prompts, sampling, seed)
        assert res["version"] == self.version
        return [Completion(**c) for c in res["completions"]]

    def sync(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        import time

        t = time.time()
        self.actors[0].update_weights(version, state)
        self.version = version
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return {"time/sync": time.time() - t, "sync_mbytes": nbytes / 2**20}

    def sleep(self) -> None:
        self.actors[0].sleep()

    def shutdown(self) -> None:
        pass


# ------------------------------------------------------------------------- TRL
def trl_args(out_dir: Path, cfg) -> dict[str, Any]:
    """TrainingArguments that make TRL do our work: same batch split, optimizer settings,
    constant LR and precision (fp32 on CPU; bf16 autocast over fp32 weights on GPU, as our
    FSDP2 mixed precision), gradient checkpointing only where ours has it on (TRL defaults
    to it), and no logging, saving, evaluation, progress bar or data-loader workers."""
    t, on_gpu = cfg.train, cfg.cluster.gpus_per_worker > 0
    return {
        "output_dir": str(out_dir),
        "report_to": [],
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": not on_gpu,
        "bf16": on_gpu,
        "gradient_checkpointing": cfg.backend.activation_checkpointing,
        "dataloader_num_workers": 0,
        "seed": t.seed,
        "max_steps": 100000,
        "learning_rate": t.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": t.weight_decay,
        "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2,
        "adam_epsilon": t.adam_eps,
        "max_grad_norm": t.max_grad_norm,
        "save_only_model": True,
    }


def channel_callback(ch):
    """A TrainerCallback that turns `trainer.train()` into one optimizer step per go: it
    blocks in on_train_begin / on_step_end until the parent asks for the next step."""
    from transformers import TrainerCallback

    class _Step(TrainerCallback):
        def _wait(self, control):
            if not ch.next():
                control.should_training_stop = True
            return control

        def on_train_begin(self, args, state, control, **kwargs):
            return self._wait(control)

        def on_step_end(self, args, state, control, **kwargs):
            ch.done()
            return self._wait(control)

    return _Step()


def quiet(trainer):
    """No console output from the trainer (its printer callback prints the final metrics)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def sequential(trainer_cls):
    """The trainer with its sampler in dataset order, so that its batches are ours."""

    class Sequential(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    Sequential.__name__ = trainer_cls.__name__
    return Sequential
