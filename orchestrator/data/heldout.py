"""Held-out evaluation prompts: prompts the run never trains on.

For a generated source (`synthetic:<name>`) the prompts come from the generator's
`<name>_heldout` stream when it has one, which is disjoint from every training stream of
that generator (an SFT warm-up included) by construction; otherwise from a second stream
of the same generator (seed + 10000) minus the training prompts. Either way, `4 n` rows
are drawn and the first `n` distinct prompts not in the training set are kept, in
stream order, so the same config always evaluates on the same prompts.
File and hub sources have no held-out split here (an empty list); evaluate those with an
explicit evaluation data set. `heldout_conversations` draws from the same stream, keeping
whole conversations (prompt and reference answer) for NLL evaluation; `heldout_texts`
documents of text sources.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.prompts import prompt_rows
from orchestrator.data.sft import to_messages
from orchestrator.data.sources import load_rows
from orchestrator.data.synthetic import GENERATORS, HELDOUT_STREAMS

HELDOUT_SEED_OFFSET = 10_000


def heldout_prompts(data_cfg: DataConfig, train_prompts: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` prompt rows (`{"messages", "answer"}`, as `prompt_rows` makes them) whose
    messages are none of `train_prompts`' messages; [] when `n` is 0 or the source is not
    a generator."""
    d = data_cfg
    if not n or not d.source.startswith("synthetic:"):
        return []
    seen = {json.dumps(p["messages"]) for p in train_prompts}
    extra = prompt_rows(load_rows(_heldout_stream(d, n)), d)
    unique = {json.dumps(p["messages"]): p for p in extra if json.dumps(p["messages"]) not in seen}
    return list(unique.values())[:n]


def _heldout_stream(d: DataConfig, n: int) -> DataConfig:
    """`4 n` rows of the generator's held-out stream (disjoint from training by construction),
    or of a second stream of the same generator."""
    name = d.source.split(":", 1)[1]
    held = HELDOUT_STREAMS.get(name, f"{name}_heldout")
    src = f"synthetic:{held}" if held in GENERATORS else d.source
    return replace(d, source=src, seed=d.seed + HELDOUT_SEED_OFFSET, num_samples=4 * n)


def heldout_conversations(data_cfg: DataConfig, n: int) -> list[list[dict[str, str]]]:
    """Up to `n` conversations (the prompt, then the reference answer as the assistant's
    message) of the stream `heldout_prompts` draws from, none whose prompt is a training
    row's prompt; [] when `n` is 0 or the source is not a generator."""
    d = data_cfg
    if not n or not d.source.startswith("synthetic:"):
        return []
    seen = {json.dumps(to_messages(r.value, "auto")[:-1]) for r in load_rows(d)}
    out: dict[str, list[dict[str, str]]] = {}
    for row in load_rows(_heldout_stream(d, n)):
        msgs = to_messages(row.value, "auto")
        key = json.dumps(msgs[:-1])
        if key not in seen and key not in out:
            out[key] = msgs
    return list(out.values())[:n]


def heldout_texts(data_cfg: DataConfig, n: int, field: str = "text") -> list[str]:
    """Up to `n` documents (`field` of text rows, for continued pretraining) of the held-out
    stream, none of them a training document; [] when `n` is 0 or the source is not a generator."""
    d = data_cfg
    if not n or not d.source.startswith("synthetic:"):
        return []
    seen = {r.value[field] for r in load_rows(d)}
    held = (r.value[field] for r in load_rows(_heldout_stream(d, n)))
    return list(dict.fromkeys(t for t in held if t not in seen))[:n]
