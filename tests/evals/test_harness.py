"""lm-evaluation-harness tasks on the eval's own models: the harness's requests answered by a
`ModelScorer` (sharded log-probs, the rollout engine's greedy generations) score every item
as the harness's own `HFLM` scores the same exported model; shipped tasks load offline; bad
task names get one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.evals.harness import load_task, run_task, shipped_tasks, task_items, task_metrics
from orchestrator.evaluation import ModelScorer
from orchestrator.models import build_model, build_tokenizer
from orchestrator.rollout.hf import HfEngine
from tests.helpers import LocalGroup

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model as an export leaves it (weights and tokenizer), and its run config."""
    cfg, _ = compose(["+experiment=sft_arith_warmup", "rollout.batch_size=1"])
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    build_model(cfg.model, torch.float32).save_pretrained(path)
    build_tokenizer(cfg.model).save_pretrained(path)
    return path, cfg


@pytest.fixture(scope="module")
def scorer(exported):
    from orchestrator.config.schema import ModelConfig

    path, cfg = exported
    spec = ModelConfig(name="x", pretrained=str(path), tokenizer=str(path))
    tok = build_tokenizer(spec)
    model = build_model(spec, torch.float32).eval()
    engine = lambda: HfEngine(spec, cfg.rollout, tok, torch.device("cpu"))  # noqa: E731
    s = ModelScorer("candidate", tok, engine, LocalGroup(model, 2), 2)
    s.max_length = model.config.max_position_embeddings
    return s


@pytest.fixture(scope="module")
def hflm(exported):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(exported[0]), device="cpu", batch_size=1, dtype="float32")


def _responses(lm, task: str, limit: int, seed: int = 0) -> list:
    """Per item: the harness's raw responses and its filtered ones (document order)."""
    from lm_eval.evaluator import evaluate

    t = load_task(task, "t", None, seed)
    res = evaluate(lm=lm, task_dict={t.config.task: t}, limit=limit, log_samples=True, bootstrap_iters=0)
    return [(s["resps"], s["filtered_resps"]) for s in sorted(res["samples"][t.config.task], key=lambda s: s["doc_id"])]


def test_shipped_tasks_load_offline_with_their_items_and_metrics():
    assert shipped_tasks() == ["arith_choice", "arith_exact"]
    choice = load_task("arith_choice", "eval.tasks[0]", None, 0)
    items = task_items(choice, 5)
    assert len(items) == 5 and items[0]["text"].startswith("Question: What is ")
    assert items[0]["target"] == str(eval(items[0]["text"].split("What is ")[1].split("?")[0]))  # the right sum
    assert list(task_metrics(choice)) == ["acc", "acc_norm"]
    assert list(task_metrics(load_task("arith_exact", "k", None, 0))) == ["exact_match"]


def test_choice_log_likelihoods_equal_the_harness_hf_model(scorer, hflm):
    from orchestrator.evals.harness import make_scorer_lm

    ours = _responses(make_scorer_lm(scorer, greedy_check=False, seed=0), "arith_choice", 8)
    theirs = _responses(hflm, "arith_choice", 8)
    for (a, _), (b, _) in zip(ours, theirs):
        assert [r[0][0] for r in a] == pytest.approx([r[0][0] for r in b], abs=1e-4)
    scores = run_task(load_task("arith_choice", "k", None, 0), scorer, 8, 0)
    assert len(scores["acc|none"]) == 8 and set(scores["acc|none"]) <= {0.0, 1.0}


def test_greedy_generations_and_is_greedy_equal_the_harness_hf_model(scorer, hflm, tmp_path):
    from orchestrator.evals.harness import make_scorer_lm

    ours = _responses(make_scorer_lm(scorer, greedy_check=True, seed=0), "arith_exact", 4)
    theirs = _responses(hflm, "arith_exact", 4)
    assert [f for _, f in ours] == [f for _, f in theirs]
    # loglikelihood (LAMBADA-style): is_greedy says whether greedy decoding gives the target;
    # the targets here are the model's own greedy continuations for half the items
    rows = [{"text": f"Question: What is {10 + i} + 3?\nAnswer:", "target": ""} for i in range(4)]
    lm = make_scorer_lm(scorer, greedy_check=True, seed=0)
    for i, r in enumerate(rows):
        ids = scorer.tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        greedy = scorer.rollout.generate([ids], _greedy(3), 0)[0].text
        r["target"] = greedy if i % 2 == 0 else "zz!"
    data = tmp_path / "cont.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yml = _task_yaml(tmp_path, "cont_task", data, "loglikelihood", "{{text}}", "{{target}}", "acc", "mean")
    got = [r[0][0] for r, _ in _responses(lm, str(yml), 4)]
    want = [r[0][0] for r, _ in _responses(hflm, str(yml), 4)]
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got][0::2] == [True, True]


def test_rolling_log_likelihoods_equal_the_harness_hf_model(scorer, hflm, tmp_path):
    from orchestrator.evals.harness import make_scorer_lm

    texts = ["The otter lives by the river and eats fish.", "a", "Every 3 days the fox eats berries near the hill."]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    yml = _task_yaml(
        tmp_path, "docs_task", data, "loglikelihood_rolling", "", "{{text}}", "word_perplexity", "weighted_perplexity"
    )
    lm = make_scorer_lm(scorer, greedy_check=False, seed=0)
    got = [r[0][0] for r, _ in _responses(lm, str(yml), 3)]
    want = [r[0][0] for r, _ in _responses(hflm, str(yml), 3)]
    assert got == pytest.approx(want, abs=1e-3)
    task = load_task(str(yml), "k", None, 0)
    assert list(task_metrics(task)) == ["log_word_perplexity"]  # compared as the mean NLL per word


def _greedy(n: int):
    from orchestrator.rollout.base import SamplingParams

    return SamplingParams(n=1, temperature=0.0, max_new_tokens=n)


def _task_yaml(tmp_path: Path, name: str, data: Path, output: str, text: str, target: str, metric: str, agg: str):
    yml = tmp_path / f"{name}.yaml"
    yml.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"output_type: {output}\ntarget_delimiter: ''\ndoc_to_text: '{text}'\ndoc_to_target: '{target}'\n"
        f"metric_list:\n  - metric: {metric}\n    aggregation: {agg}\n    higher_is_better: false\n"
    )
    return yml


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.tasks=[{kind:lm_eval}]", r"eval.tasks\[0\]: an lm_eval task needs eval.tasks\[0\].task"),
        ("eval.tasks=[{kind:nll,task:arith_choice}]", r"eval.tasks\[0\].task is read by kind lm_eval only"),
        ("eval.tasks=[{kind:lm_eval,task:/no/such/task.yaml}]", r"'/no/such/task.yaml': no such task YAML file"),
    ],
)
def test_bad_lm_eval_tasks_name_the_key(override, message, tmp_path):
    from orchestrator.stages import STAGES

    cfg, _ = compose(["stage=eval", f"run.output_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        STAGES["eval"](cfg, build_tokenizer(cfg.model))
