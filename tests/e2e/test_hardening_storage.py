"""A real run whose checkpoint filesystem fills up: the save fails as a storage error (no
restart, no retrained steps), one message names the checkpoint directory, the free space
and the cause, and the previous checkpoint stays intact and verifies."""

from __future__ import annotations

import os
import subprocess

import pytest

from orchestrator.checkpoint import CheckpointManager

pytestmark = pytest.mark.slow

COMMON = ["+experiment=sft_tiny", "checkpoint.every_steps=2", "checkpoint.export_hf=false", "data.num_samples=300"]


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}); tests/checkpoint covers RLIMIT_FSIZE")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_a_save_stops_the_run_with_one_storage_message(run_main, tmpfs, capsys):
    ckpts = tmpfs / "ckpts"
    rc, run = run_main(*COMMON, "train.max_steps=2", f"checkpoint.dir={ckpts}", name="run")
    assert rc == 0 and (ckpts / "step_00000002" / "meta.json").is_file()
    st = os.statvfs(tmpfs)
    with open(tmpfs / "filler", "wb") as f:  # leave 16 KiB: the next save cannot fit
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (16 << 10)))
    capsys.readouterr()
    rc, run = run_main(*COMMON, "train.max_steps=4", f"checkpoint.dir={ckpts}", name="run")
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    assert f"cannot write checkpoint step 4 in {ckpts}: ENOSPC" in err
    assert "free of 64.0 MiB" in err and "unexpected pos" not in err.split("error:")[-1]
    log = (run / "train.log").read_text()
    assert "Restart" not in log and "worker failure" not in log  # not treated as a dead worker
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    assert CheckpointManager(ckpts, keep_last=2, on_corrupt="stop").latest().step == 2
