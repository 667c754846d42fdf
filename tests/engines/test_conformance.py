"""Engine conformance: every backend must pass these, run through real Ray workers.

* The loss and grad norm of a step do not depend on how the global batch is split over
  ranks and micro-batches (1 rank x 4 micro-batches == 2 ranks x 1), up to float
  reduction order.
* A checkpoint saved on 2 ranks resumes on 1 (and 1 -> 2) and continues the same run.
* A non-finite gradient on one rank skips the update on every rank; policy / reference
  log-probs and the trainable state (what GRPO uses) come back in the documented form.
* `train.compile=true` (each decoder block compiled, then sharded) follows the eager run
  on 2 sharded ranks.
* tests/engines/test_cross_backend.py: FSDP2 and DeepSpeed ZeRO-3 follow the same run.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

BACKENDS = ["fsdp2", "deepspeed_zero3"]
BASE = [
    "+experiment=sft_tiny",
    "train.max_steps=6",
    "train.global_batch_size=8",
    "data.num_samples=300",
    "checkpoint.export_hf=false",
]


def _losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _grad_norms(run_dir):
    # Adam after clipping is blind to a constant gradient scale; the norm is not.
    return {m["step"]: m["grad_norm"] for m in read_metrics(run_dir)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_world_size_and_micro_batching_do_not_change_the_run(run_main, backend, method):
    runs, norms = {}, {}
    extra = ["method.dropout=0.0"] if method == "lora" else []  # dropout draws differ per rank
    for workers, micro in [(1, 2), (2, 4)]:
        rc, run_dir = run_main(
            *BASE,
            *extra,
            f"backend={backend}",
            f"method={method}",
            f"cluster.num_workers={workers}",
            f"train.micro_batch_size={micro}",
            "checkpoint.every_steps=0",
            name=f"w{workers}",
        )
        assert rc == 0
        runs[workers] = _losses(run_dir)
        norms[workers] = _grad_norms(run_dir)
    assert runs[1].keys() == runs[2].keys()
    for step in runs[1]:
        assert runs[1][step] == pytest.approx(runs[2][step], rel=2e-5), step
        assert norms[1][step] == pytest.approx(norms[2][step], rel=2e-5), step


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_blocks_follow_the_eager_run_on_two_ranks(run_main, backend):
    runs, norms = {}, {}
    for compile in (False, True):
        rc, run_dir = run_main(
            *BASE,
            f"backend={backend}",
            "cluster.num_workers=2",
            "train.max_steps=3",
            "data.num_samples=64",
            "checkpoint.every_steps=0",
            f"train.compile={compile}",
            name=f"compile_{compile}",
        )
        assert rc == 0
        runs[compile], norms[compile] = _losses(run_dir), _grad_norms(run_dir)
    assert runs[True].keys() == runs[False].keys() == {1, 2, 3}
    for step in runs[False]:
        assert runs[True][step] == pytest.approx(runs[False][step], rel=1e-5), step
        assert norms[True][step] == pytest.approx(norms[False][step], rel=1e-4), step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("save_world, load_world", [(2, 1), (1, 2)])
def test_checkpoint_reshards_across_world_sizes(run_main, backend, save_world, load_world):
    import shutil

    # The 2-rank run writes its step-3 checkpoint in the background (checkpoint.async_save).
    rc, ref = run_main(
        *BASE,
        f"backend={backend}",
        f"cluster.num_workers={save_world}",
        "checkpoint.every_steps=3",
        f"checkpoint.async_save={save_world == 2}",
        name="ref",
    )
    assert rc == 0
    # A new run dir seeded with the reference run's step-3 checkpoint, resumed on another world size.
    resumed = ref.parent / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    rc, resumed = run_main(
        *BASE,
        f"backend={backend}",
        f"cluster.num_workers={load_world}",
        "checkpoint.every_steps=3",
        "checkpoint.resume=must",
        name="resumed",
    )
    assert rc == 0
    a, b = _losses(ref), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=2e-5), step


@pytest.fixture
def engine_group(ray_cluster):
    """Build one backend's engine on 2 real Ray workers (the driver's calls, without the loop)."""
    from orchestrator.config.compose import compose
    from orchestrator.models import build_tokenizer
    from orchestrator.stages import STAGES
    from orchestrator.workers.group import WorkerGroup
    from orchestrator.workers.train_worker import TrainWorker

    groups = []

    def _build(*overrides):
        cfg, _ = compose([*BASE, "cluster.num_workers=2", *overrides])
        stage = STAGES[cfg.stage.name](cfg, build_tokenizer(cfg.model))
        workers = WorkerGroup(TrainWorker, stage.roles()["policy"])
        groups.append(workers)
        workers.call("build", 6)
        return workers, stage

    yield _build
    for workers in groups:
        workers.shutdown()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_skip_logprobs_and_inference_state(engine_group, backend):
    """A NaN gradient on one rank skips the update on every rank (and the schedule still
    advances); then what GRPO needs: policy / reference log-probs and the weights to sync,
    merged under the base model's Hugging Face names."""
    import math

    import torch

    workers, stage = engine_group(f"backend={backend}", "method=lora", "method.dropout=0.0", "train.warmup_steps=0")
    before = workers.call("inference_state")
    assert before[1] == {} and before[0]  # on rank 0 only
    before = before[0]
    # Merged adapted layers under the plain model's names: what any inference engine loads.
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model") for k in before)
    assert before["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)

    per_rank, _ = stage.next_step()
    per_rank[1][0]["world_size"] = float("nan")  # rank 1's loss scale: NaN loss and gradients there only
    results = workers.call_per_rank("train_step", per_rank)
    assert [r["skipped"] for r in results] == [1.0, 1.0]
    assert not math.isfinite(results[0]["grad_norm"])
    after = workers.call("inference_state")[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    per_rank, _ = stage.next_step()
    results = workers.call_per_rank("train_step", per_rank)
    assert [r["skipped"] for r in results] == [0.0, 0.0] and math.isfinite(results[0]["grad_norm"])
    assert results[0]["lr"] < 3e-3  # cosine decay: the schedule advanced through the skipped step
    after = workers.call("inference_state")[0]
    assert any(not torch.equal(before[k], after[k]) for k in before)

    mbs = [per_rank[0][:1]] * 2  # both ranks score the same rows
    policy = workers.call_per_rank("forward_logprobs", mbs)
    reference = workers.call_per_rank("forward_logprobs", mbs, reference=True)
    row = mbs[0][0]["input_ids"]
    assert policy[0][0].shape == (row.shape[0], row.shape[1] - 1) and policy[0][0].dtype == torch.float32
    torch.testing.assert_close(policy[0][0], policy[1][0])
    assert (policy[0][0] <= 0).all() and (policy[0][0] - reference[0][0]).abs().max() > 1e-4
