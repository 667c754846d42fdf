"""Engine conformance: every backend must pass these, run through real Ray workers.

* The loss of a step does not depend on how the global batch is split over ranks and
  micro-batches (1 rank x 4 micro-batches == 2 ranks x 2), up to float reduction order.
* A checkpoint saved on 2 ranks resumes on 1 (and 1 -> 2) and continues the same run.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

BACKENDS = ["fsdp2", "deepspeed_zero3"]
BASE = ["+experiment=sft_tiny", "train.max_steps=6", "train.global_batch_size=8", "data.num_samples=300",
        "checkpoint.export_hf=false"]


def _losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_world_size_and_micro_batching_do_not_change_the_run(run_main, backend, method):
    runs = {}
    extra = ["method.dropout=0.0"] if method == "lora" else []  # dropout draws differ per rank
    for workers, micro in [(1, 2), (2, 4)]:
        rc, run_dir = run_main(*BASE, *extra, f"backend={backend}", f"method={method}",
                               f"cluster.num_workers={workers}",
                               f"train.micro_batch_size={micro}", "checkpoint.every_steps=0",
                               name=f"w{workers}")
        assert rc == 0
        runs[workers] = _losses(run_dir)
    assert runs[1].keys() == runs[2].keys()
    for step in runs[1]:
        assert runs[1][step] == pytest.approx(runs[2][step], rel=2e-5), step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("save_world, load_world", [(2, 1), (1, 2)])
def test_checkpoint_reshards_across_world_sizes(run_main, backend, save_world, load_world):
    import shutil

    rc, ref = run_main(*BASE, f"backend={backend}", f"cluster.num_workers={save_world}",
                       "checkpoint.every_steps=3", name="ref")
    assert rc == 0
    # A new run dir seeded with the reference run's step-3 checkpoint, resumed on another world size.
    resumed = ref.parent / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    rc, resumed = run_main(*BASE, f"backend={backend}", f"cluster.num_workers={load_world}",
                           "checkpoint.every_steps=3", "checkpoint.resume=must", name="resumed")
    assert rc == 0
    a, b = _losses(ref), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=2e-5), step
