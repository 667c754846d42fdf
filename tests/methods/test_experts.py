"""method=experts on real tiny MoE models, in-process (no Ray): which weights train, how
experts are chosen from router statistics, optimizer memory, export/delta round trip,
the base as GRPO reference, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from orchestrator.config.compose import compose
from orchestrator.config.schema import ExpertsMethodConfig, ModelConfig, TrainConfig
from orchestrator.config.validate import validate
from orchestrator.engines.optim import build_optimizer
from orchestrator.errors import ConfigError
from orchestrator.methods.base import Reference
from orchestrator.methods.experts import Experts, delta_io
from orchestrator.methods.experts.__main__ import main as cli
from orchestrator.methods.full import Full
from orchestrator.models import build_model
from orchestrator.models.moe import moe_layers, router_statistics
from orchestrator.models.tokenizer import byte_tokenizer
from orchestrator.roles import policy_spec

TINY = ModelConfig(
    name="t",
    arch="qwen3_moe",
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
FUSED = ("gate_up_proj", "down_proj")


def _train(model, steps=3, lr=1e-2):
    opt = build_optimizer(model, TrainConfig(lr=lr))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(5, 200, (2, 24), generator=gen)
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return opt


def _merged_state(method, model, tmp_path):
    out = method.export(model, tmp_path / "export", byte_tokenizer(), base_ref="unused")
    return AutoModelForCausalLM.from_pretrained(out["model"]).state_dict(), out


def _changed(before, after):
    """{param name: sorted changed expert indices, or 'all' for a non-expert tensor}."""
    out = {}
    for k, v in before.items():
        if torch.equal(v, after[k]):
            continue
        if k.rsplit(".", 1)[-1] in FUSED:
            out[k] = [e for e in range(v.shape[0]) if not torch.equal(v[e], after[k][e])]
        else:
            out[k] = "all"
    return out


@pytest.mark.parametrize("options", [{}, {"train_router": True}, {"train_attention": True}])
def test_only_selected_expert_slices_and_chosen_modules_change(tmp_path, options):
    model = build_model(TINY, torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = Experts(ExpertsMethodConfig(experts={0: [1, 3], 1: [0]}, **options))
    model = method.apply(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    slices = [n for n in trainable if ".parametrizations." in n]
    assert len(slices) == 4 and all(n.endswith(".0.weight") for n in slices)
    _train(model)
    after, _ = _merged_state(method, model, tmp_path)

    expected = {f"model.layers.0.mlp.experts.{p}": [1, 3] for p in FUSED}
    expected.update({f"model.layers.1.mlp.experts.{p}": [0] for p in FUSED})
    if options.get("train_router"):
        expected.update({f"model.layers.{i}.mlp.gate.weight": "all" for i in range(2)})
    if options.get("train_attention"):
        expected.update({k: "all" for k in before if ".self_attn." in k})
    assert _changed(before, after) == expected  # everything else is bit-identical


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_cfg(tmp_path, *overrides):
    data = _jsonl(tmp_path / "a.jsonl", [{"prompt": "a" * 100, "completion": "a" * 100}] * 8)
    cfg, _ = compose(
        [
            "method=experts",
            "model=tiny_moe",
            "model.num_layers=2",
            "data=jsonl",
            f"data.source={data}",
            f"run.output_dir={tmp_path / 'run'}",
            "logger=console",
            *overrides,
        ]
    )
    return cfg


def _bias_router_to_experts_3_and_6(model, rows):
    """Make layer 0's router send tokens like 'a' to expert 3 first and 6 second."""
    gate = model.model.layers[0].mlp.gate
    seen = []
    h = gate.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    ids = torch.tensor([rows[0]["input_ids"]])
    model(input_ids=ids, position_ids=torch.tensor([rows[0]["position_ids"]]))
    h.remove()
    a = ids[0] == byte_tokenizer()("a", add_special_tokens=False)["input_ids"][0]
    x = seen[0].reshape(ids.shape[1], -1)[a].mean(0)
    with torch.no_grad():
        gate.weight[3] = 50 * x / x.dot(x)
        gate.weight[6] = 25 * x / x.dot(x)


@pytest.mark.parametrize("score, expected", [("token", [3, 6]), ("gate", [3])])
def test_router_statistics_choose_the_experts_the_data_routes_to(tmp_path, score, expected):
    from orchestrator.methods.experts.selection import stats_rows

    cfg = _run_cfg(tmp_path, f"method.score={score}", "method.threshold=0.8", "method.stats_tokens=1000")
    model = build_model(cfg.model, torch.float32)
    rows = stats_rows(cfg, byte_tokenizer(), cfg.method.stats_tokens)
    assert sum(len(r["input_ids"]) for r in rows) == 1000
    _bias_router_to_experts_3_and_6(model, rows)

    # The hook-based counts agree with transformers' own router logits (softmax top-k).
    tokens, _, seen = router_statistics(model, rows[:1])
    out = model(
        input_ids=torch.tensor([rows[0]["input_ids"]]),
        position_ids=torch.tensor([rows[0]["position_ids"]]),
        output_router_logits=True,
        use_cache=False,
    )
    for layer, logits in enumerate(out.router_logits):
        top = logits.softmax(-1).topk(2, dim=-1).indices.flatten()
        assert torch.equal(tokens[layer], torch.bincount(top, minlength=8).double())
    assert seen == len(rows[0]["input_ids"])

    method = Experts(cfg.method, policy_spec(cfg))
    method.apply(model)
    assert method.selection[0] == expected
    record = json.loads((tmp_path / "run" / "experts_selection.json").read_text())
    assert record["source"] == "router" and record["experts"]["0"] == expected
    assert record["stats_tokens"] == 1000
    assert (tmp_path / "run" / "experts_selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A restart (same request) reuses the saved choice instead of measuring a changed model.
    again = Experts(cfg.method, policy_spec(cfg))
    again.apply(build_model(cfg.model, torch.float32))
    assert again.selection == method.selection


def _state_bytes(opt):
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.ndim > 0
    )


def test_optimizer_state_scales_with_the_number_of_selected_experts():
    per_expert = sum(p[0].numel() for p in build_model(TINY, torch.float32).model.layers[0].mlp.experts.parameters())
    sizes = {}
    for k in (1, 2, 4):
        model = Experts(ExpertsMethodConfig(experts=list(range(k)))).apply(build_model(TINY, torch.float32))
        sizes[k] = _state_bytes(_train(model, steps=1))
    full = _state_bytes(_train(Full(None).apply(build_model(TINY, torch.float32)), steps=1))
    # AdamW: two fp32 moments per trainable element, k experts x 2 layers.
    assert sizes == {k: k * TINY.num_layers * per_expert * 2 * 4 for k in (1, 2, 4)}
    assert full > 10 * sizes[1]
    print(f"optimizer state: experts k=1 {sizes[1]} B, k=2 {sizes[2]} B, k=4 {sizes[4]} B, full {full} B")


def test_export_delta_applied_to_base_equals_export_and_matches_trainable_state(tmp_path):
    cfg = _run_cfg(tmp_path, "method.experts={0:[2],1:[5,7]}", "method.train_router=true")
    initial = build_model(cfg.model, torch.float32).state_dict()
    method = Experts(cfg.method, policy_spec(cfg))
    model = method.apply(build_model(cfg.model, torch.float32))
    _train(model)
    # What weight sync sends (trainable params, + index buffers under FSDP2) is the delta.
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    from_model = delta_io.from_model(model)
    assert len(from_model) == 2 * 2 * 2 + 2  # 2 layers x 2 fused x (slices, ids) + 2 routers
    for sd in (state, {k: v for k, v in state.items() if not k.endswith(".index")}):
        from_state = delta_io.from_state_dict(sd, method.selection)  # ZeRO-3 sends no buffers
        assert from_state.keys() == from_model.keys()
        assert all(torch.equal(from_state[k], from_model[k]) for k in from_model)

    out = method.export(model, tmp_path / "export", byte_tokenizer(), base_ref=None)
    base = AutoModelForCausalLM.from_pretrained(out["base"]).state_dict()
    assert all(torch.equal(base[k], initial[k]) for k in initial)  # the base training started from
    applied = tmp_path / "applied"  # the `python -m orchestrator.methods.experts apply` entry
    assert cli(["apply", "--base", out["base"], "--delta", out["delta"], "--out", str(applied)]) == 0
    assert (
        cli(
            [
                "apply",
                "--base",
                out["base"],
                "--delta",
                str(applied / "model.safetensors"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 1
    )  # not a delta: a clear error, no output
    assert not (tmp_path / "x").exists()
    a = AutoModelForCausalLM.from_pretrained(applied).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out["model"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _changed(base, b) == {
        "model.layers.0.mlp.experts.gate_up_proj": [2],
        "model.layers.0.mlp.experts.down_proj": [2],
        "model.layers.1.mlp.experts.gate_up_proj": [5, 7],
        "model.layers.1.mlp.experts.down_proj": [5, 7],
        "model.layers.0.mlp.gate.weight": "all",
        "model.layers.1.mlp.gate.weight": "all",
    }


def test_reference_is_the_base_with_slices_off_and_sync_weights_are_merged():
    base = build_model(TINY, torch.float32).eval()
    method = Experts(ExpertsMethodConfig(experts=[0, 1, 2, 3]))
    model = method.apply(build_model(TINY, torch.float32))
    _train(model, lr=5e-2)
    model.eval()
    ids = torch.randint(5, 200, (1, 16))
    assert method.reference is Reference.WEIGHTS_OFF
    with torch.no_grad():
        with method.reference_context(model):
            ref = model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
        assert torch.equal(ref, base(input_ids=ids).logits)
        assert (policy - ref).abs().max() > 1e-3
        # Weight sync: merged fused tensors under transformers names make a plain model the policy.
        plain = build_model(TINY, torch.float32).eval()
        merged = method.hf_weights(model.state_dict())
        assert merged and all(".parametrizations." not in k for k in merged)
        plain.load_state_dict(merged, strict=False)
        torch.testing.assert_close(plain(input_ids=ids).logits, policy, rtol=0, atol=0)
    # With whole modules training there is no frozen base inside: the reference is a frozen copy.
    other = Experts(ExpertsMethodConfig(experts=[0], train_router=True))
    other.apply(build_model(TINY, torch.float32))
    assert other.reference is Reference.FROZEN_COPY


def test_shared_experts_option_on_qwen2_moe():
    cfg = Qwen2MoeConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in moe_layers(model):
        assert layer.shared_params and all(".shared_expert" in n for n in layer.shared_params)
    model = Experts(ExpertsMethodConfig(experts=[3], train_shared_experts=True)).apply(model)
    _train(model)
    params = dict(model.named_parameters())
    for k, v in before.items():
        if ".shared_expert" in k:
            assert not torch.equal(params[k], v), k
        elif k.rsplit(".", 1)[-1] in FUSED:
            plist = params[k.replace("experts.", "experts.parametrizations.") + ".original"]
            assert torch.equal(plist, v)  # the frozen base of the fused tensor never moves
        else:
            assert torch.equal(params[k], v), k


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny_moe", "method.experts=[8]"], "expert 8 in layer 0 is out of range"),
        (["model=tiny_moe", "method.experts={9:[1]}"], "layer 9 has no experts"),
        (["model=tiny_moe", "method.experts=[]"], "selects no expert"),
        (["model=tiny_moe", "method.experts={0:[],1:[]}"], "selects no expert"),
        (["model=tiny_llama"], "needs a mixture-of-experts model"),
        (["model=tiny_moe", "method.threshold=1.5"], "method.threshold=1.5 must be in (0, 1]"),
        (["model=tiny_moe", "method.train_shared_experts=true"], "has no shared experts"),
    ],
)
def test_bad_input_is_a_config_error_before_training(overrides, message):
    cfg, _ = compose(["method=experts", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]").replace("[", r"\[")):
        validate(cfg)


def test_bad_input_exits_2_without_starting_a_run(tmp_path):
    from orchestrator.__main__ import main

    run_dir = tmp_path / "run"
    assert main(["method=experts", "model=tiny_moe", "method.experts=[12]", f"run.output_dir={run_dir}"]) == 2
    assert not run_dir.exists()


@pytest.mark.gpu
def test_bf16_base_with_fp32_slices_trains_on_gpu():
    model = build_model(TINY, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = Experts(ExpertsMethodConfig(experts=[1])).apply(model).cuda()
    slices = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in slices)
    _train(model)
    merged = {k: v.cpu() for k, v in delta_io.from_model(model).items()}
    base = model.model.layers[0].mlp.experts.parametrizations.gate_up_proj.original.cpu()
    assert torch.equal(base, before["model.layers.0.mlp.experts.gate_up_proj"])
    assert not torch.equal(merged["model.layers.0.mlp.experts.gate_up_proj"][0], base[1])


def test_esft_threshold_cap_and_ties():
    from orchestrator.methods.experts.selection import esft_select

    layers = moe_layers(build_model(TINY, torch.float32))
    scores = torch.tensor(
        [
            [0, 5, 0, 3, 2, 0, 0, 0],  # shares .5 .3 .2
            [1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.float64,
    )  # all tied
    assert esft_select(scores, layers, 0.5, 0) == {0: [1], 1: [0, 1, 2, 3]}
    assert esft_select(scores, layers, 0.8, 0) == {0: [1, 3], 1: [0, 1, 2, 3, 4, 5, 6]}
    assert esft_select(scores, layers, 1.0, 2) == {0: [1, 3], 1: [0, 1]}
    assert esft_select(scores, layers, 1.0, 0)[0] == [1, 3, 4]  # never experts with no share


def test_stats_sample_covers_prompt_only_rows(tmp_path):
    from orchestrator.methods.experts.selection import stats_rows

    data = _jsonl(tmp_path / "q.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}] * 5)
    cfg, _ = compose(["method=experts", "model=tiny_moe", "data=jsonl", f"data.source={data}"])
    rows = stats_rows(cfg, byte_tokenizer(), 10_000)
    text = byte_tokenizer().decode(rows[0]["input_ids"])
    assert text.count("What is 2 + 2?") == 5 and "<|im_start|>assistant" in text
