"""CheckpointManager: replacing a step never loses it (a failure, and a real crash, between
the two renames), and verification at resume (a truncated or altered file in the latest
checkpoint: fall back to the newest intact one, or stop naming the file)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from orchestrator.checkpoint import MANIFEST, CheckpointManager
from orchestrator.errors import CheckpointError, CorruptCheckpointError
from tests.conftest import REPO


def _writer(content: bytes):
    def write(d: str) -> None:
        (Path(d) / "rank0.pt").write_bytes(content)
        (Path(d) / "critic").mkdir()  # other trained roles write below the step directory
        (Path(d) / "critic" / "__0_0.distcp").write_bytes(content * 3)

    return write


def _save(m: CheckpointManager, step: int, content: bytes) -> Path:
    return m.save(step, _writer(content), {"stage": {"pos": step}})


# ------------------------------------------------------------------ atomic commit
def test_failed_rename_while_replacing_a_step_keeps_the_old_one(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=2)
    _save(m, 2, b"old")
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new directory into place: fails
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr("orchestrator.checkpoint.os.rename", failing_rename)
    with pytest.raises(CheckpointError, match="saving checkpoint step 2 .* failed"):
        _save(m, 2, b"new")
    monkeypatch.undo()
    assert (tmp_path / "step_00000002" / "rank0.pt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]  # no .tmp, no .old
    assert CheckpointManager(tmp_path, keep_last=2).latest().step == 2


CRASH = """
import os, sys
from pathlib import Path
from orchestrator.checkpoint import CheckpointManager
root, when = Path(sys.argv[1]), sys.argv[2]
m = CheckpointManager(root, keep_last=2)
m.save(2, lambda d: (Path(d) / "rank0.pt").write_bytes(b"old"), {"stage": {}})
real_rename = os.rename
def rename(src, dst):
    if when == "before_new_in" and Path(src).name.endswith(".tmp"):
        os._exit(9)  # the process dies: old step aside, new one not yet in place
    real_rename(src, dst)
    if when == "after_new_in" and Path(dst).name == "step_00000002":
        os._exit(9)  # the process dies before deleting the old copy
os.rename = rename
m.save(2, lambda d: (Path(d) / "rank0.pt").write_bytes(b"new"), {"stage": {}})
"""


@pytest.mark.parametrize("when, expect", [("before_new_in", b"old"), ("after_new_in", b"new")])
def test_crash_between_the_renames_loses_nothing(tmp_path, when, expect, caplog):
    out = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path), when],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 9, out.stderr
    assert (tmp_path / ".step_00000002.old").is_dir()
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        m = CheckpointManager(tmp_path, keep_last=2)
    latest = m.latest()
    assert latest.step == 2 and (latest.path / "rank0.pt").read_bytes() == expect
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    if when == "before_new_in":
        assert "restoring" in caplog.text and "step_00000002" in caplog.text


# ------------------------------------------------------------------- verification
def test_manifest_lists_every_file_with_size_and_crc(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    path = _save(m, 2, b"abc")
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert files == {
        "critic/__0_0.distcp": {"size": 9, "crc32": f"{zlib.crc32(b'abcabcabc'):08x}"},
        "rank0.pt": {"size": 3, "crc32": f"{zlib.crc32(b'abc'):08x}"},
    }


def _corrupt_latest(tmp_path, how: str) -> None:
    m = CheckpointManager(tmp_path, keep_last=3)
    for step in (2, 4, 6):
        _save(m, step, f"state at step {step}".encode())
    shard = tmp_path / "step_00000006" / "critic" / "__0_0.distcp"
    data = shard.read_bytes()
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "altered":
        shard.write_bytes(data[:-1] + b"X")
    else:
        shard.unlink()


@pytest.mark.parametrize("how, why", [("truncated", "bytes"), ("altered", "CRC32"), ("missing", "missing")])
def test_corrupt_latest_falls_back_to_the_newest_intact_one(tmp_path, caplog, how, why):
    _corrupt_latest(tmp_path, how)
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        latest = CheckpointManager(tmp_path, keep_last=3).latest()
    assert latest.step == 4
    assert "step_00000006 is corrupt: critic/__0_0.distcp" in caplog.text and why in caplog.text
    assert (tmp_path / "step_00000006.corrupt").is_dir()  # kept for inspection, out of the way
    assert CheckpointManager(tmp_path, keep_last=3).latest().step == 4


def test_corrupt_latest_with_on_corrupt_stop_names_the_file(tmp_path):
    _corrupt_latest(tmp_path, "truncated")
    m = CheckpointManager(tmp_path, keep_last=3, on_corrupt="stop")
    with pytest.raises(CorruptCheckpointError, match=r"step_00000006 is corrupt: critic/__0_0\.distcp has \d+ bytes"):
        m.latest()
    assert (tmp_path / "step_00000006").is_dir()  # nothing moved


def test_directory_without_meta_or_manifest(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep_last=3)
    _save(m, 2, b"x")
    (tmp_path / "step_00000004").mkdir()  # copied by hand, half-deleted, ...: no meta.json
    (tmp_path / "step_00000002" / MANIFEST).unlink()  # saved before manifests existed
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        latest = CheckpointManager(tmp_path, keep_last=3).latest()
    assert latest.step == 2
    assert "skipping" in caplog.text and "step_00000004: no meta.json" in caplog.text
    assert "no manifest" in caplog.text


def test_sizes_only_manifest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, checksum=False)
    path = _save(m, 2, b"abc")
    assert json.loads((path / MANIFEST).read_text())["files"]["rank0.pt"] == {"size": 3}
    (path / "rank0.pt").write_bytes(b"ab")
    with pytest.raises(CorruptCheckpointError, match="rank0.pt has 2 bytes, 3 when saved"):
        CheckpointManager(tmp_path, keep_last=2, on_corrupt="stop").latest()
