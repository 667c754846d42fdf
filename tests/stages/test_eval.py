"""The eval stage and its gate on fake scores (no Ray): which candidate is promoted, what is
written where, bad input, resume; and the log-prob scoring against the model itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from orchestrator.config.compose import compose
from orchestrator.config.evaluation import GateRule
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.evals.gate import Comparison, decide
from orchestrator.evaluation import ModelScorer
from orchestrator.models import build_model, build_tokenizer
from orchestrator.rollout.base import Completion
from orchestrator.stages import STAGES
from orchestrator.stages.eval import GateRejected
from tests.helpers import LocalGroup


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def candidate_run(tmp_path_factory) -> Path:
    """A finished training run as the driver leaves it: config.yaml, summary.json, export/hf."""
    run = tmp_path_factory.mktemp("sft_run")
    cfg, _ = compose(["+experiment=sft_arith_warmup", f"run.output_dir={run}"])
    (run / "config.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    )
    export = run / "export" / "hf"
    build_model(cfg.model, torch.float32).save_pretrained(export)
    build_tokenizer(cfg.model).save_pretrained(export)
    (run / "summary.json").write_text(json.dumps({"exports": {"model": str(export)}, "run_dir": str(run)}))
    return run


class FakeScorer:
    """A model whose answers and NLL the test decides: `right(i)` says whether item i's greedy
    answer (and its i-th sampled one) is correct; `nll` is its per-token NLL on item i."""

    def __init__(self, tokenizer, items_of, right, nll):
        self.tokenizer, self.items_of, self.right, self.nll = tokenizer, items_of, right, nll
        self.calls = 0

    def _index(self, messages) -> int:
        return [it["messages"] for it in self.items_of()].index(list(messages))

    def generate(self, prompts, sampling, seed):
        self.calls += 1
        out = []
        for p in prompts:
            i = self._index(p)
            answer = self.items_of()[i]["answer"]
            out += [Completion([], answer if self.right(i, j) else "-1") for j in range(sampling.n)]
        return out

    def completion_logprobs(self, pairs):
        self.calls += 1
        return [(-self.nll(i) * 2.0, 2) for i, _ in enumerate(pairs)]

    def close(self):
        pass


def _stage(candidate_run: Path, tmp_path: Path, *overrides: str):
    cfg, _ = compose(
        [
            "stage=eval",
            f"eval.candidate={candidate_run}",
            f"run.output_dir={tmp_path / 'eval'}",
            "eval.samples=60",
            "eval.permutation_resamples=2000",
            "eval.bootstrap_resamples=500",
            *overrides,
        ]
    )
    validate(cfg)
    tok = build_tokenizer(cfg.model)
    stage = STAGES["eval"](cfg, tok)
    (tmp_path / "eval").mkdir(exist_ok=True)
    return stage, tok


def _fake(stage, tok, cand_right, base_right, cand_nll, base_nll) -> None:
    gen = next((t for t in stage.tasks if t.kind == "generation"), None)
    items = (lambda: gen.items) if gen else (lambda: [])
    stage.scorers = {
        "candidate": FakeScorer(tok, items, cand_right, cand_nll),
        "base": FakeScorer(tok, items, base_right, base_nll),
    }


def _run(stage) -> dict:
    for step in range(1, stage.total_steps + 1):
        stage.step(None, step)
    return stage.summary()


def test_default_tasks_and_gate_come_from_the_candidates_run(candidate_run, tmp_path):
    stage, _ = _stage(candidate_run, tmp_path)
    assert [(t.name, t.kind, len(t.items)) for t in stage.tasks] == [
        ("nll_heldout", "nll", 60),
        ("generation_heldout", "generation", 60),
    ]
    assert stage.base.spec.pretrained is None and stage.base.spec.init_seed == 1234  # the run's random start
    assert stage.candidate.training_data().source == "synthetic:arithmetic_noisy"
    assert [(k, r.significant) for k, r in stage.rules] == [("nll_heldout/nll", True)]
    assert set(stage.roles()) == {"candidate", "base"}
    assert stage.roles()["base"].colocate_with == "candidate" and not stage.roles()["base"].trainable


def test_a_better_candidate_is_promoted_and_nothing_is_written_into_its_run(candidate_run, tmp_path):
    before = _tree_hash(candidate_run)
    stage, tok = _stage(
        candidate_run,
        tmp_path,
        "eval.gate=[{metric:accuracy,min_delta:0.1,significant:true},{metric:nll,max_regression:0.05}]",
    )
    _fake(stage, tok, lambda i, j: i % 5 != 0, lambda i, j: i % 2 == 0, lambda i: 1.0 + 1e-3 * i, lambda i: 1.2)
    out = _run(stage)
    assert out["eval_decision"] == "PROMOTE"
    run_dir = tmp_path / "eval"
    report = json.loads((run_dir / "report.json").read_text())
    acc = next(m for m in report["metrics"] if m["key"] == "generation_heldout/accuracy")
    assert acc["candidate"] == pytest.approx(0.8) and acc["base"] == pytest.approx(0.5)
    assert acc["test"] == "mcnemar_midp" and acc["p_value"] < 0.01
    assert acc["candidate_ci"][0] < 0.8 < acc["candidate_ci"][1]
    assert all(r["passed"] for r in report["gate"]["rules"])
    card = (run_dir / "README.md").read_text()
    assert "PROMOTE" in card and "synthetic:arithmetic_noisy" in card and "sha256" in card
    assert (run_dir / "report.md").read_text().startswith("# Evaluation: PROMOTE")
    assert (run_dir / "promoted").resolve() == (candidate_run / "export" / "hf").resolve()
    assert _tree_hash(candidate_run) == before


def test_an_equal_candidate_is_rejected_and_fail_on_reject_exits_non_zero(candidate_run, tmp_path):
    stage, tok = _stage(candidate_run, tmp_path, f"eval.base={candidate_run}", "eval.fail_on_reject=true")
    _fake(stage, tok, lambda i, j: i % 2 == 0, lambda i, j: i % 2 == 0, lambda i: 1.0, lambda i: 1.0)
    (tmp_path / "eval" / "promoted.json").write_text("{}")  # from an earlier eval that promoted
    with pytest.raises(GateRejected, match="REJECT") as exc:
        _run(stage)
    assert exc.value.exit_code == 3
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["decision"] == "REJECT" and report["metrics"][0]["delta"] == 0.0
    assert report["metrics"][0]["p_value"] == 1.0
    assert not (tmp_path / "eval" / "promoted.json").exists()


def test_a_worse_candidate_is_rejected(candidate_run, tmp_path):
    stage, tok = _stage(candidate_run, tmp_path)
    _fake(stage, tok, lambda i, j: True, lambda i, j: True, lambda i: 2.0, lambda i: 1.0 + 0.01 * i)
    out = _run(stage)
    assert out["eval_decision"] == "REJECT" and "eval_promoted" not in out


def test_a_guard_regression_rejects_a_candidate_that_improved_the_target(candidate_run, tmp_path):
    stage, tok = _stage(
        candidate_run,
        tmp_path,
        "eval.gate=[{metric:generation_heldout/accuracy,significant:true},"
        "{metric:nll_heldout/nll,max_regression:0.1,relative:true}]",
    )
    # accuracy 0.9 vs 0.3 (significant), but NLL 1.5 vs 1.2: 25% worse, the guard allows 10%
    _fake(stage, tok, lambda i, j: i % 10 != 0, lambda i, j: i % 10 < 3, lambda i: 1.5, lambda i: 1.2 + 1e-3 * i)
    _run(stage)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    target, guard = report["gate"]["rules"]
    assert target["passed"] and not guard["passed"] and report["decision"] == "REJECT"
    assert "beyond the allowed regression" in guard["reasons"][0]


def test_pass_at_k_from_samples(candidate_run, tmp_path):
    stage, tok = _stage(
        candidate_run,
        tmp_path,
        "eval.tasks=[{kind:generation,samples:4,k:[1,2],temperature:1.0,items:10}]",
    )
    # item i: samples j < i % 5 are right (0..4 of 4 right); greedy counts as sample 0
    _fake(stage, tok, lambda i, j: j < i % 5, lambda i, j: False, None, None)
    _run(stage)
    metrics = {m["key"]: m for m in json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]}
    per_item_c = [i % 5 for i in range(10)]
    from orchestrator.algos.eval_stats import pass_at_k

    for k in (1, 2):
        want = sum(pass_at_k(4, min(c, 4), k) for c in per_item_c) / 10
        assert metrics[f"generation_heldout/pass@{k}"]["candidate"] == pytest.approx(want)
    assert metrics["generation_heldout/pass@2"]["test"] == "paired_permutation"


def test_holm_adjusts_several_significance_rules_together():
    def comp(task: str, p: float) -> Comparison:
        return Comparison(task, "accuracy", True, 100, 0.6, (0.5, 0.7), 0.5, (0.4, 0.6), 0.1, (0.0, 0.2), p, "t")

    comps = {"a/accuracy": comp("a", 0.03), "b/accuracy": comp("b", 0.04)}
    rules = [(k, GateRule(metric=k, significant=True)) for k in comps]
    decision = decide(comps, rules, alpha=0.05)  # each p < 0.05 alone; Holm: 0.06 and 0.06
    assert [r.p_adjusted for r in decision.rules] == pytest.approx([0.06, 0.06])
    assert decision.verdict == "REJECT"
    assert decide({"a/accuracy": comps["a/accuracy"]}, rules[:1], alpha=0.05).verdict == "PROMOTE"


def test_bad_gate_metric_names_the_key_and_the_choices(candidate_run, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.gate\[0\].metric='acc'.*nll_heldout/nll"):
        _stage(candidate_run, tmp_path, "eval.gate=[{metric:acc,significant:true}]")
    with pytest.raises(ConfigError, match=r"eval.gate\[0\] .* sets no condition"):
        _stage(candidate_run, tmp_path, "eval.gate=[{metric:nll}]")


def test_an_eval_refuses_to_write_into_the_candidates_run_dir(candidate_run, tmp_path):
    cfg, _ = compose(["stage=eval", f"eval.candidate={candidate_run}", f"run.output_dir={candidate_run}"])
    with pytest.raises(ConfigError, match="candidate's own run directory"):
        STAGES["eval"](cfg, build_tokenizer(cfg.model))


def test_a_model_dir_without_a_run_needs_a_base(candidate_run, tmp_path):
    cfg, _ = compose(
        ["stage=eval", f"eval.candidate={candidate_run / 'export' / 'hf'}", f"run.output_dir={tmp_path}/e"]
    )
    stage = STAGES["eval"](cfg, build_tokenizer(cfg.model))  # the export names its run: base known
    assert stage.candidate.run_dir == candidate_run
    lone = tmp_path / "lone"
    (lone).mkdir()
    for f in (candidate_run / "export" / "hf").iterdir():
        (lone / f.name).write_bytes(f.read_bytes())
    cfg, _ = compose(["stage=eval", f"eval.candidate={lone}", f"run.output_dir={tmp_path}/e2"])
    with pytest.raises(ConfigError, match="eval.base is not set"):
        STAGES["eval"](cfg, build_tokenizer(cfg.model))


def test_resume_reuses_finished_tasks_only_for_the_same_models(candidate_run, tmp_path):
    stage, tok = _stage(candidate_run, tmp_path)
    _fake(stage, tok, lambda i, j: True, lambda i, j: False, lambda i: 1.0, lambda i: 2.0)
    stage.step(None, 1)
    state = json.loads(json.dumps(stage.state_dict()))  # as meta.json holds it
    again, _ = _stage(candidate_run, tmp_path)
    again.load_state_dict(state)
    _fake(again, tok, lambda i, j: True, lambda i, j: False, lambda i: 1.0, lambda i: 2.0)
    again.step(None, 1)
    assert again.scorers["candidate"].calls == 0  # nll_heldout came from the checkpoint
    other, _ = _stage(candidate_run, tmp_path, f"eval.base={candidate_run}")
    other.load_state_dict(state)
    _fake(other, tok, lambda i, j: True, lambda i, j: False, lambda i: 1.0, lambda i: 2.0)
    other.step(None, 1)
    assert other.scorers["candidate"].calls == 1  # another base: scored again


def test_choice_task_picks_the_most_likely_choice(candidate_run, tmp_path):
    rows = [{"question": f"q{i}", "choices": ["a", "bb", "c"], "answer": i % 3} for i in range(6)]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    stage, tok = _stage(candidate_run, tmp_path, f"eval.tasks=[{{kind:choice,source:{path}}}]")
    assert stage.tasks[0].name == "choice_mc" and [it["answer"] for it in stage.tasks[0].items] == [0, 1, 2, 0, 1, 2]

    class Scorer:
        def completion_logprobs(self, pairs):  # "a" has the highest sum, "bb" (2 tokens) the best mean
            return [{"a": (-1.0, 1), "bb": (-1.2, 2), "c": (-3.0, 1)}[c[0]["content"]] for _, c in pairs]

    scores = stage.tasks[0].score(Scorer())
    assert scores["accuracy"].x == [1, 0, 0, 1, 0, 0] and scores["accuracy_norm"].x == [0, 1, 0, 0, 1, 0]


def test_completion_logprobs_map_every_shard_back_to_its_item(candidate_run):
    from orchestrator.data.chat import split_completion

    model_dir = candidate_run / "export" / "hf"
    tok = build_tokenizer(OmegaConf.to_object(OmegaConf.structured(_model_spec(model_dir))))
    model = build_model(_model_spec(model_dir), torch.float32).eval()
    # 7 items of different lengths over 2 ranks in micro-batches of 2: padding, a dummy row
    pairs = [
        ([{"role": "user", "content": "x" * (i + 1)}], [{"role": "assistant", "content": "y" * i + "z"}])
        for i in range(7)
    ]
    got = ModelScorer("candidate", tok, lambda: None, LocalGroup(model, 2), micro_batch=2).completion_logprobs(pairs)
    for (prompt, completion), (lp, n) in zip(pairs, got):
        p, c = split_completion(tok, prompt, completion)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = logp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum()
        assert n == len(c) and lp == pytest.approx(float(want), abs=1e-4)


def _model_spec(model_dir: Path):
    from orchestrator.config.schema import ModelConfig

    return ModelConfig(name="x", pretrained=str(model_dir), tokenizer=str(model_dir))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "eval.tasks=[{kind:generation,samples:2,k:[1,4]}]",
            r"eval.tasks\[0\].k=\[1, 4\]: pass@k needs 1 <= k <= samples",
        ),
        ("eval.tasks=[{kind:generation,samples:4,temperature:0}]", r"eval.tasks\[0\]: samples=4 at temperature 0"),
        ("eval.alpha=1.5", r"eval.alpha=1.5 must be in \(0, 1\)"),
        ("eval.tasks=[{kind:nll,reward:nope}]", r"eval.tasks\[0\].reward='nope' is not a reward"),
        ("eval.candidate=/no/such/run", r"eval.candidate='/no/such/run': no such directory"),
    ],
)
def test_bad_eval_config_fails_before_any_worker_with_the_key(override, message, tmp_path):
    cfg, _ = compose(["stage=eval", f"run.output_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        STAGES["eval"](cfg, build_tokenizer(cfg.model))


def test_text_logprobs_score_every_token_after_the_first_with_eos(candidate_run):
    model_dir = candidate_run / "export" / "hf"
    tok = build_tokenizer(_model_spec(model_dir))
    model = build_model(_model_spec(model_dir), torch.float32).eval()
    texts = ["The otter lives by the river.", "a", "Every 3 days the fox eats berries near the hill."]
    got = ModelScorer("base", tok, lambda: None, LocalGroup(model, 2), micro_batch=2).text_logprobs(texts)
    for text, (lp, n) in zip(texts, got):
        ids = list(tok(text)["input_ids"]) + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        assert n == len(ids) - 1 and lp == pytest.approx(
            float(logp[torch.arange(n), torch.tensor(ids[1:])].sum()), abs=1e-4
        )


def test_nll_items_of_text_sources_are_documents(tmp_path):
    from orchestrator.config.schema import DataConfig
    from orchestrator.evals.items import load_items

    path = tmp_path / "general.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(5)))
    assert load_items("nll", str(path), "train", 3, None, "k") == [{"text": f"document {i}"} for i in range(3)]
    train = DataConfig(source="synthetic:text", num_samples=200)  # a continued-pretraining run's data
    held = load_items("nll", None, "train", 20, train, "k")
    assert len(held) == 20 and all(set(it) == {"text"} for it in held)
