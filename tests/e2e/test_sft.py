"""End to end through the real entry, on the session's 2-node Ray cluster, 2 workers
over gloo: SFT learns, and what it exports loads in transformers / peft and generates."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def _generate(model, tok, prompt="What is 2 + 3?"):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return out


def _assert_learns(run_dir: Path, drop: float):
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert mean(losses[-5:]) < mean(losses[:5]) - drop, losses


def test_full_sft_learns_checkpoints_exports_and_logs_to_wandb(run_main):
    rc, run_dir = run_main(
        "+experiment=sft_tiny",
        "train.max_steps=30",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=2",
        "logger=wandb",
        "run.callbacks=[tests.helpers:RecordLogprobs]",
        "+extra.record_logprobs_at=30",
    )
    assert rc == 0
    _assert_learns(run_dir, drop=1.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["resumed_from"] == 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000020", "step_00000030"]  # keep_last=2 retention
    assert (run_dir / "train.log").read_text().count("step 30/30") == 1
    # W&B really ran (offline in tests) and wrote its run files in the run dir.
    assert summary["wandb"] and list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))

    export = Path(summary["exports"]["model"])
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    _generate(model, tok)
    # The export is the trained model: its log-probs on a batch equal those the trained,
    # sharded policy computed on its workers after the last step.
    assert model.config.architectures == ["LlamaForCausalLM"]
    from orchestrator.models.logprobs import token_logprobs
    from tests.helpers import RecordLogprobs

    trained = torch.load(run_dir / RecordLogprobs.FILE)
    with torch.no_grad():
        exported, _ = token_logprobs(model.eval(), RecordLogprobs.batch(), 256)
    torch.testing.assert_close(exported, trained, rtol=1e-5, atol=1e-5)


def test_lora_sft_exports_adapter_loadable_with_peft_and_merged(run_main):
    from peft import PeftModel

    rc, run_dir = run_main(
        "+experiment=sft_tiny_lora", "train.max_steps=24", "checkpoint.every_steps=0", "method.export_merged=true"
    )
    assert rc == 0
    _assert_learns(run_dir, drop=0.3)
    exports = json.loads((run_dir / "summary.json").read_text())["exports"]
    base = AutoModelForCausalLM.from_pretrained(exports["base"])
    tok = AutoTokenizer.from_pretrained(exports["adapter"])
    peft_model = PeftModel.from_pretrained(base, exports["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"]).eval()
    ids = tok("Reverse the word: apple", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
        b = merged(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - plain).abs().max() > 1e-3  # the adapter is trained, not a no-op
    _generate(peft_model, tok)
