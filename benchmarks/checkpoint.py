"""Checkpoint save of model + AdamW state: ours (`engine.save`, DCP) vs `torch.save`.

Both sides hold the same model after one optimizer step (so AdamW's moments exist) and
write into a fresh directory each round, on the same file system. Ours is what the
driver's checkpoint calls on each rank: the model and optimizer state dicts through
`torch.distributed.checkpoint.state_dict`, `dcp.save` (which fsyncs its files), plus the
rank's scheduler/RNG file. The peer is one `torch.save` of `{"model", "optim"}` state
dicts (no fsync). Neither side includes the directory rename that makes ours atomic.

A third contender is `checkpoint.async_save`: `engine.save(path, blocking=False)` times
what the training loop waits for (the in-memory copy of the state); the background write
is awaited outside the timed region.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import local_worker, policy_spec_of
from benchmarks.harness import interleave, result, time_ratio
from benchmarks.sft import _cfg, _rows, _work


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ours(ch, cfg, root: Path, mode: str) -> dict[str, Any]:
    stage, _ = _rows(cfg)
    worker = local_worker(policy_spec_of(stage))
    worker.train_step(stage.next_step()[0][0])
    i, size = 0, 0
    while ch.next():
        path = root / f"{mode}_{i}"
        if mode == "sync":
            worker.save(str(path))
            ch.done()
        else:  # checkpoint.async_save: the part the training loop waits for
            worker.save(str(path), False)
            ch.done()
            worker.save_done(True)
        size = _dir_bytes(path)
        shutil.rmtree(path)
        i += 1
    return {"bytes_written": size}


def peer(ch, cfg, root: Path) -> dict[str, Any]:
    from orchestrator.data.batching import collate
    from orchestrator.models import build_model

    stage, tok = _rows(cfg)
    t = cfg.train
    model = build_model(cfg.model, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    b = collate(stage.source.rows[: t.micro_batch_size], tok.pad_token_id)
    logits = model(input_ids=b["input_ids"]).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100).backward()
    opt.step()
    i, size = 0, 0
    while ch.next():
        path = root / f"torch_{i}"
        path.mkdir()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path / "state.pt")
        ch.done()
        size = _dir_bytes(path)
        shutil.rmtree(path)
        i += 1
    return {"bytes_written": size}


def checkpoint_save(work_dir: Path, warmup: int, repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    w = _work(smoke)
    cfg = _cfg(work_dir, w, 2, threads)
    root = work_dir / "ckpt"
    root.mkdir()
    res = interleave(
        {
            "ours": (ours, {"cfg": cfg, "root": root, "mode": "sync"}),
            "torch_save": (peer, {"cfg": cfg, "root": root}),
            "ours_async": (ours, {"cfg": cfg, "root": root, "mode": "async"}),
        },
        warmup,
        repeats,
        threads,
    )
    out = {name: result(r) for name, r in res.items()}
    out["ours_async"]["note"] = "checkpoint.async_save=true: time the training loop is blocked"
    return {
        "title": "Checkpoint save, model + AdamW state",
        "unit": "s/save",
        "work": {
            **w,
            "bytes_ours": out["ours"]["bytes_written"],
            "bytes_torch_save": out["torch_save"]["bytes_written"],
        },
        "contenders": out,
        "ratios": [
            time_ratio("ours/torch_save (sync)", out, "ours", "torch_save", 1.2),
            time_ratio("ours_async blocking/ours sync", out, "ours_async", "ours", 0.1),
        ],
        "notes": [
            (
                "ours fsyncs every file (DCP default) and writes per-rank shards with a plan; "
                "torch.save writes one pickle without fsync"
            )
        ],
    }
