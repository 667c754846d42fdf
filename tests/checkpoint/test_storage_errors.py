"""A checkpoint write that fails for lack of space, a read-only filesystem or a file-size
limit is a StorageError naming the checkpoint directory, the free space and the cause, and
the previous checkpoint stays intact. The disk is really full: a 2 MiB tmpfs (needs root to
mount; skipped otherwise), and a file-size limit (RLIMIT_FSIZE) that needs no privilege."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import CheckpointManager
from orchestrator.engines.ckpt_io import ShardWriter
from orchestrator.errors import StorageError
from tests.conftest import REPO


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB filesystem (tmpfs)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}); the RLIMIT_FSIZE test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _write(shard_mib: float, local_mib: float = 0.0):
    """A write_shards callback: one rank's ShardWriter with DCP shards and rank0.pt of these sizes."""

    def write(path: str) -> None:
        shards = {"model": {"w": torch.zeros(int(shard_mib * 2**18))}}
        local = {"rng": torch.zeros(int(local_mib * 2**18))}
        ShardWriter().save(path, 0, shards, local, blocking=True)

    return write


@pytest.mark.parametrize("too_big", ["dcp_shards", "rank_file"])
def test_full_disk_is_a_storage_error_and_keeps_the_previous_checkpoint(small_fs, too_big):
    m = CheckpointManager(small_fs / "ckpts", keep_last=2)
    m.save(1, _write(0.1), {"stage": {}})
    big = _write(4) if too_big == "dcp_shards" else _write(0.01, local_mib=4)
    with pytest.raises(StorageError) as info:
        m.save(2, big, {"stage": {}})
    msg = str(info.value)
    assert f"in {small_fs / 'ckpts'}: ENOSPC (No space left on device)" in msg
    assert "free of 2.0 MiB" in msg and "previous checkpoints are untouched" in msg
    assert "unexpected pos" not in msg
    assert sorted(p.name for p in (small_fs / "ckpts").iterdir()) == ["step_00000001"]  # tmp removed
    latest = CheckpointManager(small_fs / "ckpts", keep_last=2, on_corrupt="stop").latest()
    assert latest.step == 1  # and it verifies against its manifest


def test_read_only_filesystem_is_a_storage_error(small_fs):
    m = CheckpointManager(small_fs / "ckpts", keep_last=2)
    m.save(1, _write(0.1), {"stage": {}})
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(StorageError, match="EROFS"):
        m.save(2, _write(0.1), {"stage": {}})
    assert (small_fs / "ckpts" / "step_00000001" / "meta.json").is_file()


def test_background_write_failure_is_a_storage_error(small_fs, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        writer = ShardWriter()
        writer.save(str(small_fs / ".step_00000003.tmp"), 0, {"w": torch.zeros(2**20)}, {}, blocking=False)
        with pytest.raises(StorageError, match="ENOSPC"):
            writer.done(wait=True)
    finally:
        dist.destroy_process_group()


FSIZE = """
import resource, signal, sys, torch
from orchestrator.checkpoint import CheckpointManager
from orchestrator.engines.ckpt_io import ShardWriter
from orchestrator.errors import StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a signal
m = CheckpointManager(sys.argv[1], keep_last=2)
m.save(1, lambda d: ShardWriter().save(d, 0, {"w": torch.zeros(1000)}, {}, True), {"stage": {}})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    m.save(2, lambda d: ShardWriter().save(d, 0, {"w": torch.zeros(1 << 20)}, {}, True), {"stage": {}})
except StorageError as exc:
    print("STORAGE", exc)
"""


def test_file_size_limit_is_a_storage_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", FSIZE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert "STORAGE cannot write checkpoint step 2" in out.stdout, out.stderr[-3000:]
    assert "EFBIG" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_an_io_error_in_the_driver_commit_is_a_storage_error(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    m.write(5, lambda d: None)
    with pytest.raises(StorageError, match=f"checkpoint step 5 in {tmp_path}: EDQUOT"):
        m.abort(5, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert not (tmp_path / ".step_00000005.tmp").exists()


def test_other_errors_are_not_storage_errors(tmp_path):
    from orchestrator.checkpoint import storage_error

    assert storage_error(RuntimeError("CUDA error: an illegal memory access"), str(tmp_path)) is None
    assert storage_error(ValueError(uuid.uuid4().hex), str(tmp_path)) is None
    assert storage_error(OSError(errno.ECONNRESET, "reset"), str(tmp_path)) is None
    # torch's C++ writer losing the OSError on a disk that has room is not one either
    assert (
        storage_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"), str(tmp_path)) is None
    )
    assert not list(Path(tmp_path).iterdir())  # the probe cleaned up after itself
