"""Preference losses: hand-computed values, and conformance with TRL 1.16 on the same tiny
model and batch (loss and every parameter's gradient within 1e-5).

TRL is driven through its own code: `DPOTrainer` and `KTOTrainer` instances compute their
loss on a batch of their own collator, with a frozen reference model; CPO's SimPO and ORPO
(in `trl.experimental`) run their `concatenated_forward` / loss methods on an object that
carries the attributes those methods read, as a trainer would.
"""

from __future__ import annotations

import math
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from orchestrator.algos.preference import (
    PREFERENCE_LOSSES,
    PairBatch,
    kto_kl,
    kto_loss,
    log1mexp,
    sequence_logps,
)
from orchestrator.data.chat import IGNORE


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two pairs: policy and reference sums, completion lengths 2 and 4 / 3 and 1.
B = PairBatch(
    chosen=torch.tensor([-2.0, -3.0]),
    rejected=torch.tensor([-4.0, -1.0]),
    chosen_len=torch.tensor([2, 3]),
    rejected_len=torch.tensor([4, 1]),
    ref_chosen=torch.tensor([-3.0, -3.0]),
    ref_rejected=torch.tensor([-3.0, -2.0]),
)
D = [2.0, -1.0]  # (c - rc) - (r - rr): (1 - (-1)), (0 - 1)


def test_dpo_sigmoid_cdpo_robust_hinge_by_hand():
    beta = 0.5
    losses, chosen, rejected = PREFERENCE_LOSSES["sigmoid"](B, beta)
    assert losses.tolist() == pytest.approx([-math.log(_sig(beta * d)) for d in D], rel=1e-6)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    e = 0.2
    cdpo, _, _ = PREFERENCE_LOSSES["sigmoid"](B, beta, label_smoothing=e)
    want = [-(1 - e) * math.log(_sig(beta * d)) - e * math.log(_sig(-beta * d)) for d in D]
    assert cdpo.tolist() == pytest.approx(want, rel=1e-6)
    robust, _, _ = PREFERENCE_LOSSES["robust"](B, beta, label_smoothing=e)
    want = [((1 - e) * -math.log(_sig(beta * d)) + e * math.log(_sig(-beta * d))) / (1 - 2 * e) for d in D]
    assert robust.tolist() == pytest.approx(want, rel=1e-6)
    hinge, _, _ = PREFERENCE_LOSSES["hinge"](B, beta)
    assert hinge.tolist() == [0.0, 1.5]  # max(0, 1 - 0.5 * 2), max(0, 1 + 0.5)


def test_ipo_normalises_each_log_ratio_by_its_length():
    beta = 0.25
    losses, _, _ = PREFERENCE_LOSSES["ipo"](B, beta)
    # pair 1: 1/2 - (-1)/4 = 0.75 ; pair 2: 0/3 - 1/1 = -1 ; target 1/(2 beta) = 2
    assert losses.tolist() == pytest.approx([(0.75 - 2) ** 2, (-1 - 2) ** 2])


def test_simpo_and_orpo_use_mean_token_logps_and_no_reference():
    free = PairBatch(B.chosen, B.rejected, B.chosen_len, B.rejected_len)  # no reference at all
    assert PREFERENCE_LOSSES["simpo"].is_reference_free and PREFERENCE_LOSSES["orpo"].is_reference_free
    assert not any(PREFERENCE_LOSSES[n].is_reference_free for n in ("sigmoid", "ipo", "hinge", "robust"))
    losses, chosen, _ = PREFERENCE_LOSSES["simpo"](free, beta=2.0, gamma=0.5)
    avg = [(-1.0, -1.0), (-1.0, -1.0)]  # -2/2, -4/4 ; -3/3, -1/1
    assert losses.tolist() == pytest.approx([-math.log(_sig(2.0 * (c - r) - 0.5)) for c, r in avg])
    assert chosen.tolist() == [-2.0, -2.0]
    losses, _, _ = PREFERENCE_LOSSES["orpo"](free, beta=0.1)
    odds = math.log(math.exp(-1) / (1 - math.exp(-1)))
    assert losses.tolist() == pytest.approx([-0.1 * math.log(_sig(odds - odds))] * 2)  # equal odds: 0.1 log 2
    assert PREFERENCE_LOSSES["orpo"].nll_weight == 1.0


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-6, -0.5, -2.0, -40.0], dtype=torch.float64)
    assert log1mexp(x).tolist() == pytest.approx([math.log(-math.expm1(v)) for v in x.tolist()], rel=1e-12)


def test_kto_loss_and_kl_reference_point_by_hand():
    logps, ref = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-2.0, -4.0, -2.0])
    kl = kto_kl(torch.tensor([-3.0, -1.0]), torch.tensor([-3.5, -2.5]))
    assert kl.item() == 1.0  # mean(0.5, 1.5)
    assert kto_kl(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 0.0  # clamped at 0
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(logps, ref, desirable, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    # log-ratios 1, -1, 0
    want = [2 * (1 - _sig(0.5 * (1 - 1))), 1 - _sig(0.5 * (1 + 1)), 2 * (1 - _sig(0.5 * (0 - 1)))]
    assert losses.tolist() == pytest.approx(want)
    assert rewards.tolist() == [0.5, -0.5, 0.0]


def test_sequence_logps_sums_completion_targets_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    labels = torch.tensor([[7, IGNORE, 8, 9], [7, IGNORE, IGNORE, IGNORE]])
    sums, counts = sequence_logps(logp, labels)
    assert sums.tolist() == [-5.0, 0.0] and counts.tolist() == [2, 0]


# ------------------------------------------------------------------ TRL conformance
ROWS = [
    {"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1) + "!" * (a % 3)}
    for a, b in [(12, 3), (40, 7), (25, 9), (61, 2)]
]


@pytest.fixture(scope="module")
def tiny():
    """A policy and a different frozen reference (another init), and the tokenizer."""
    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_model, build_tokenizer

    spec = ModelConfig(name="t", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    tok = build_tokenizer(spec)
    policy = build_model(spec, torch.float32)
    ref = build_model(ModelConfig(**{**spec.__dict__, "init_seed": 99}), torch.float32).eval().requires_grad_(False)
    return policy, ref, tok


def _mb_from_trl(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = batch["input_ids"]
    return {
        "input_ids": ids,
        "labels": ids.masked_fill(batch["completion_mask"] == 0, IGNORE),
        "position_ids": torch.arange(ids.shape[1]).repeat(ids.shape[0], 1),
    }


def _ref_sums(ref, mb) -> torch.Tensor:
    from orchestrator.models.logprobs import token_logprobs

    with torch.no_grad():
        return sequence_logps(token_logprobs(ref, mb, 256)[0], mb["labels"])[0]


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours, theirs):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b.to(loss_a.dtype), rtol=1e-5, atol=1e-6)
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def _dpo_ctx(loss: str, beta: float, ls: float, sft_weight: float, mb) -> dict:
    b = mb["input_ids"].shape[0] // 2
    chosen_tokens = int((mb["labels"][:b, 1:] != IGNORE).sum())
    nll_weight = PREFERENCE_LOSSES[loss].nll_weight + sft_weight
    return {
        "loss_type": loss,
        "beta": beta,
        "label_smoothing": ls,
        "gamma": 0.5,
        "nll_weight": nll_weight,
        "world_size": 1,
        "num_pairs": b,
        "num_chosen_tokens": chosen_tokens,
        "logits_chunk_mb": 256,
    }


@pytest.fixture(scope="module")
def dpo_trainer(tiny, tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, ref, tok = tiny
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=len(ROWS),
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    data = Dataset.from_list(ROWS)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


@pytest.mark.parametrize(
    "loss, beta, smoothing, sft_weight",
    [
        ("sigmoid", 0.1, 0.0, 0.0),
        ("ipo", 0.5, 0.0, 0.0),
        ("hinge", 0.3, 0.0, 0.0),
        ("robust", 0.2, 0.15, 0.0),
        ("sigmoid", 0.1, 0.0, 0.7),
    ],
    ids=["sigmoid", "ipo", "hinge", "robust", "sigmoid+sft_weight"],
)
def test_dpo_losses_equal_trl_dpo_trainer(tiny, dpo_trainer, loss, beta, smoothing, sft_weight):
    from orchestrator.stages.dpo import DpoStage

    policy, ref, _ = tiny
    trainer, batch = dpo_trainer
    # TRL's "sft" loss is the RPO term: the mean NLL of the chosen completion tokens.
    trainer.loss_types, trainer.loss_weights = (
        [loss] + (["sft"] if sft_weight else []),
        [1.0] + ([sft_weight] if sft_weight else []),
    )
    trainer.beta, trainer.label_smoothing = beta, smoothing
    policy.train()
    theirs = _loss_and_grads(policy, lambda: trainer.compute_loss(policy, batch))
    mb = _mb_from_trl(batch)
    mb["ref_logps"] = _ref_sums(ref, mb)
    mb |= _dpo_ctx(loss, beta, smoothing, sft_weight, mb)
    ours = _loss_and_grads(policy, lambda: DpoStage.loss(policy, mb)[0])
    _assert_same(ours, theirs)
    # and the metrics TRL logs
    _, metrics = DpoStage.loss(policy, mb)
    n = metrics["pairs"].item()
    logged = trainer._metrics["train"]
    assert metrics["rewards_chosen_sum"].item() / n == pytest.approx(logged["rewards/chosen"][-1], abs=1e-5)
    assert metrics["accuracies_sum"].item() / n == pytest.approx(logged["rewards/accuracies"][-1])
    assert metrics["logps_rejected_sum"].item() / n == pytest.approx(logged["logps/rejected"][-1], rel=1e-5)


def _experimental_trainer(cls, own: tuple[str, ...], tok, **attrs):
    """An object with the attributes and methods TRL's CPO / ORPO loss code reads."""
    ns = SimpleNamespace(
        is_encoder_decoder=False,
        pad_token_id=tok.pad_token_id,
        padding_value=tok.pad_token_id,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        label_smoothing=0.0,
        concatenated_inputs=cls.concatenated_inputs,
        get_batch_logps=cls.get_batch_logps,
        **attrs,
    )
    for name in own:
        setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    return ns


def _pairs_and_trl_batch(tok):
    """Our tokenized pairs, and the same ids in the chosen_* / rejected_* form of CPO / ORPO."""
    from orchestrator.config.schema import DataConfig
    from orchestrator.data.collate import paired_collate
    from orchestrator.data.preference import tokenize_pairs
    from orchestrator.data.sources import RawRow

    d = DataConfig(source="rows.jsonl")
    pairs = tokenize_pairs([RawRow(f"rows:row {i}", r) for i, r in enumerate(ROWS)], tok, d)
    mb = paired_collate(pairs, tok.pad_token_id)
    b = len(pairs)
    batch = {}
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
        ids, labels = mb["input_ids"][rows], mb["labels"][rows]
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_labels"] = labels
        lengths = torch.tensor([len(p["prompt_ids"]) + len(p[f"{side}_ids"]) for p in pairs])
        batch[f"{side}_attention_mask"] = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    return mb, batch


@pytest.mark.parametrize("smoothing, cpo_alpha", [(0.0, 0.0), (0.1, 1.0)], ids=["simpo", "simpo+smoothing+nll"])
def test_simpo_equals_trl_cpo_trainer(tiny, smoothing, cpo_alpha):
    from trl.experimental.cpo import CPOTrainer

    from orchestrator.stages.dpo import DpoStage

    policy, _, tok = tiny
    beta, gamma = 2.0, 0.8
    cpo = _experimental_trainer(
        CPOTrainer,
        ("concatenated_forward", "cpo_loss", "get_batch_loss_metrics"),
        tok,
        loss_type="simpo",
        alpha=0.0,
        simpo_gamma=gamma,
        beta=beta,
        cpo_alpha=cpo_alpha,
    )
    cpo.label_smoothing = smoothing
    mb, batch = _pairs_and_trl_batch(tok)
    theirs = _loss_and_grads(policy, lambda: cpo.get_batch_loss_metrics(policy, batch)[0])
    ctx = _dpo_ctx("simpo", beta, smoothing, cpo_alpha, mb)
    ours = _loss_and_grads(policy, lambda: DpoStage.loss(policy, mb | ctx | {"gamma": gamma})[0])
    _assert_same(ours, theirs)


def test_orpo_equals_trl_orpo_trainer_with_the_nll_on_completion_tokens(tiny):
    from trl.experimental.orpo import ORPOTrainer

    from orchestrator.stages.dpo import DpoStage

    policy, _, tok = tiny
    beta = 0.25
    orpo = _experimental_trainer(ORPOTrainer, ("concatenated_forward", "odds_ratio_loss"), tok, beta=beta)
    mb, batch = _pairs_and_trl_batch(tok)

    def trl_loss() -> torch.Tensor:
        chosen, rejected, chosen_logits, _, _ = orpo.concatenated_forward(policy, batch)
        losses = orpo.odds_ratio_loss(chosen, rejected)[0]
        # ORPOTrainer's NLL also covers the prompt tokens; ours (and the paper's) only the
        # chosen completion: the same cross-entropy over the chosen labels, as CPOTrainer has it.
        labels = batch["chosen_labels"][:, 1:]
        nll = F.cross_entropy(chosen_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return nll - losses.mean()

    theirs = _loss_and_grads(policy, trl_loss)
    ours = _loss_and_grads(policy, lambda: DpoStage.loss(policy, mb | _dpo_ctx("orpo", beta, 0.0, 0.0, mb))[0])
    _assert_same(ours, theirs)


def test_kto_equals_trl_kto_trainer(tiny, tmp_path_factory):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from orchestrator.models.logprobs import token_logprobs
    from orchestrator.stages.kto import KtoStage

    policy, ref, tok = tiny
    rows = [
        {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
        for r in ROWS
        for k in ("chosen", "rejected")
    ]
    args = KTOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_kto")),
        per_device_train_batch_size=len(rows),
        beta=0.3,
        desirable_weight=1.5,
        undesirable_weight=0.7,
        report_to=[],
        use_cpu=True,
        train_sampling_strategy="sequential",
    )
    data = Dataset.from_list(rows)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.train()
    theirs = _loss_and_grads(policy, lambda: trainer.compute_loss(policy, batch))

    mb = _mb_from_trl(batch)
    kl_mb = _mb_from_trl({"input_ids": batch["KL_input_ids"], "completion_mask": batch["KL_completion_mask"]})
    with torch.no_grad():
        kl_policy = sequence_logps(token_logprobs(policy, kl_mb, 256)[0], kl_mb["labels"])[0]
    kl = kto_kl(kl_policy, _ref_sums(ref, kl_mb))
    assert kl.item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-5)
    mb |= {
        "ref_logps": _ref_sums(ref, mb),
        "desirable": batch["label"].bool(),
        "kl": kl,
        "beta": 0.3,
        "desirable_weight": 1.5,
        "undesirable_weight": 0.7,
        "num_examples": len(rows),
        "world_size": 1,
        "logits_chunk_mb": 256,
    }
    ours = _loss_and_grads(policy, lambda: KtoStage.loss(policy, mb)[0])
    _assert_same(ours, theirs)
