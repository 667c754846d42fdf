"""TrainWorker: one Ray actor per rank of a role, holding that role's engine.

It is built from a role spec (`orchestrator.roles.RoleSpec`): the model, method, backend,
optimizer and loss of one role, never the whole run config."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class TrainWorker:
    def __init__(self, spec, rank: int, world_size: int):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.use_gpu = spec.cluster.gpus_per_worker > 0
        torch.set_num_threads(max(1, spec.cluster.cpus_per_worker))
        self.engine = None

    # --------------------------------------------------------------- rendezvous
    def node_info(self) -> dict[str, Any]:
        import ray

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        if self.use_gpu:
            torch.cuda.set_device(0)  # Ray exposes exactly this worker's GPU(s)
        dist.init_process_group(
            backend="nccl" if self.use_gpu else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=self.spec.cluster.dist_timeout_s),
        )

    # ------------------------------------------------------------------- engine
    def build(self, total_steps: int) -> dict[str, int]:
        from orchestrator.engines import get_engine_class

        device = torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")
        torch.manual_seed(self.spec.seed + self.rank)
        self.engine = get_engine_class(self.spec.backend.name)(
            self.spec, self.rank, self.world_size, device, total_steps
        )
        self.loss_fn = self.spec.loss
        return self.engine.param_counts

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        self._calls = getattr(self, "_calls", 0) + 1
        loss_fn = self.loss_fn
        # Fault injection for reliability tests: ORCHESTRATOR_FAULT_NAN="rank:n" makes this
        # rank's loss NaN on its n-th train step (counted since the worker started).
        fault = os.environ.get("ORCHESTRATOR_FAULT_NAN", "")
        if fault and fault == f"{self.rank}:{self._calls}":

            def loss_fn(model, mb, _inner=self.loss_fn):  # noqa: E306
                loss, metrics = _inner(model, mb)
                return loss * float("nan"), {k: v * float("nan") for k, v in metrics.items()}

        return self.engine.train_step(micro_batches, loss_fn)

    def memory_peak(self) -> int | None:
        """Most bytes this rank's CUDA allocator has held so far (None on CPU, which has no
        allocator counter to read)."""
        return int(torch.cuda.max_memory_allocated()) if self.use_gpu else None

    def forward_logprobs(self, micro_batches: list[dict[str, Any]], reference: bool = False) -> list[torch.Tensor]:
        return self.engine.forward_logprobs(micro_batches, reference)

    def forward_eval(self, micro_batches: list[dict[str, Any]], fn) -> list[Any]:
        return self.engine.forward_eval(micro_batches, fn)

    def inference_state(self) -> dict[str, torch.Tensor]:
        return self.engine.inference_state()

    def save(self, path: str, blocking: bool = True) -> None:
        self.engine.save(path, blocking)

    def save_done(self, wait: bool = False) -> bool:
        return self.engine.save_done(wait)

    def load(self, path: str) -> None:
        self.engine.load(path)

    def export_hf(self, out_dir: str, tokenizer) -> dict[str, str]:
        return self.engine.export_hf(out_dir, tokenizer)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
