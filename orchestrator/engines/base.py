"""The Engine seam: one rank of a sharding backend (FSDP2, DeepSpeed ZeRO-3).

An engine is built inside a TrainWorker actor after torch.distributed is initialised.
Every method below is called on all ranks at once (most are collectives). Every backend
passes the shared conformance tests in tests/engines/.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Protocol

import torch

# loss_fn(model, micro_batch) -> (loss to backward, {metric name: 0-d tensor or float summed over micro-batches})
LossFn = Callable[[torch.nn.Module, Dict[str, Any]], Any]


class Engine(Protocol):
    param_counts: Dict[str, int]
    """{"params_total": ..., "params_trainable": ...} of the unsharded model."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, total_steps: int): ...

    def train_step(self, micro_batches: List[Dict[str, Any]], loss_fn: LossFn) -> Dict[str, float]:
        """Forward/backward every micro-batch, clip, step (skipped on all ranks if the global
        grad norm is non-finite), schedule. Returns summed loss_fn metrics plus grad_norm, lr,
        skipped (0/1) and local_finite (0/1, this rank's metrics were finite)."""

    def forward_logprobs(self, micro_batches: List[Dict[str, Any]], reference: bool = False) -> List[torch.Tensor]:
        """No-grad log-probs of `input_ids[:, 1:]` under the policy (or the frozen reference:
        the base with adapters disabled for LoRA), one float32 CPU tensor [B, L-1] per micro-batch."""

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """What weight sync sends to rollout workers: full (unsharded) CPU tensors of the
        trainable weights (all weights for `full`, adapter weights for `lora`), keyed as in
        the unwrapped model's state_dict. Collective; rank 0 returns the dict, others {}."""

    def save(self, path: str, blocking: bool = True) -> None:
        """Write this rank's shard of model + optimizer state and its local state (scheduler,
        RNG) into `path` (a directory all ranks share). Reloadable on another world size.
        blocking=False: copy the state in memory, return, and write in the background
        (`engines.ckpt_io.ShardWriter`); `save_done` says when it is on disk."""

    def save_done(self, wait: bool = False) -> bool:
        """True once this rank's last save is fully written (wait: block until then); raises
        the background write's error."""

    def load(self, path: str) -> None: ...

    def export_hf(self, out_dir: str, tokenizer) -> Dict[str, str]:
        """Gather and write a `transformers`/`peft`-loadable model under out_dir (rank 0);
        returns {kind: path}."""
