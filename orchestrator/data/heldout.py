"""Held-out evaluation prompts: prompts the run never trains on.

For a generated source (`synthetic:<name>`) the prompts come from the generator's
`<name>_heldout` stream when it has one, which is disjoint from every training stream of
that generator (an SFT warm-up included) by construction; otherwise from a second stream
of the same generator (seed + 10000) minus the training prompts. Either way, `4 n` rows
are drawn and the first `n` distinct prompts not in the training set are kept, in
stream order, so the same config always evaluates on the same prompts.
File and hub sources have no held-out split here (an empty list); evaluate those with an
explicit evaluation data set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestrator.config.schema import DataConfig
from orchestrator.data.prompts import prompt_rows
from orchestrator.data.sources import load_rows
from orchestrator.data.synthetic import GENERATORS

HELDOUT_SEED_OFFSET = 10_000


def heldout_prompts(data_cfg: DataConfig, train_prompts: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` prompt rows (`{"messages", "answer"}`, as `prompt_rows` makes them) whose
    messages are none of `train_prompts`' messages; [] when `n` is 0 or the source is not
    a generator."""
    d = data_cfg
    if not n or not d.source.startswith("synthetic:"):
        return []
    seen = {json.dumps(p["messages"]) for p in train_prompts}
    held = f"{d.source}_heldout"
    # the `_heldout` stream is disjoint from training by construction
    src = held if held.split(":", 1)[1] in GENERATORS else d.source
    extra = prompt_rows(
        load_rows(replace(d, source=src, seed=d.seed + HELDOUT_SEED_OFFSET, num_samples=4 * n)),
        d,
    )
    unique = {json.dumps(p["messages"]): p for p in extra if json.dumps(p["messages"]) not in seen}
    return list(unique.values())[:n]
