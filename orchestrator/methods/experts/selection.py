"""Which experts `method=experts` trains: an explicit list, or ESFT scores on the training data.

Automatic selection follows ESFT (Wang et al., "Let the Expert Stick to His Last",
arXiv:2407.01906): run the base model over a sample of the training data and score every
expert of every MoE layer by

* `token`: its share of the routed (token, expert) pairs (ESFT-Token), or
* `gate`: its share of the routing weight (ESFT-Gate),

each normalised to sum to 1 within the layer. Per layer, experts are taken in descending
score until their cumulative share reaches `threshold` (ESFT's top_p). Deviations from the
reference code: `max_per_layer` caps the count per layer (ESFT has no cap); the gate score
uses the weights the model really mixes experts with (after top-k renormalisation where the
architecture does it, e.g. Qwen3-MoE), where ESFT logged DeepSeek-V2's raw top-k softmax
values; ties are broken by the lower expert index, so the choice is deterministic.

The sample is the run's own data source rendered by the tokenizer's chat template (prompt
and completion tokens alike, as ESFT does), shuffled with `data.seed`, packed into
`data.max_seq_len` rows, up to `method.stats_tokens` tokens. Rows without a completion (GRPO
prompts: `prompt` or GSM8K-style `question`) contribute their prompt.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import ConfigError, DataError
from orchestrator.models.moe import MoeLayer

log = logging.getLogger("orchestrator")
SELECTION_FILE = "experts_selection.json"
HEATMAP_FILE = "experts_selection.png"
Selection = dict[int, list[int]]


# ---------------------------------------------------------------- explicit selection
def _index_list(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"method.experts{where} must be a list of expert indices, got {value!r}")
    return sorted(set(value))


def parse_explicit(spec: Any, layers: Sequence[MoeLayer]) -> Selection:
    """`method.experts` -> {decoder layer: sorted expert indices}, checked against the model.

    A list applies to every MoE layer; a dict maps decoder layer -> list; a string is the
    path of a selection JSON (this module's output, or ESFT's expert config)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(Path(spec).expanduser().read_text())["experts"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"method.experts={spec!r}: not a readable selection JSON with an "
                f"'experts' object ({type(exc).__name__}: {exc})"
            ) from exc
    by_layer = {layer.index: layer for layer in layers}
    if isinstance(spec, dict):
        sel: Selection = {}
        for key, value in spec.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"method.experts: layer key {key!r} is not an integer") from None
            if idx not in by_layer:
                raise ConfigError(
                    f"method.experts: layer {idx} has no experts; the MoE layers of this "
                    f"model are {_ranges(sorted(by_layer))}"
                )
            sel[idx] = _index_list(value, f"[{idx}]")
    else:
        experts = _index_list(spec, "")
        sel = {idx: list(experts) for idx in by_layer}
    for idx, experts in sel.items():
        n = by_layer[idx].num_experts
        bad = [e for e in experts if not 0 <= e < n]
        if bad:
            raise ConfigError(
                f"method.experts: expert {bad[0]} in layer {idx} is out of range; the model "
                f"has {n} experts per layer (valid indices 0..{n - 1})"
            )
    if not any(sel.values()):
        raise ConfigError(
            "method.experts selects no expert: give at least one index (e.g. "
            "method.experts=[0,1] or method.experts={0:[1,3]}), or leave it unset (null) "
            "to choose experts from router statistics"
        )
    return {idx: e for idx, e in sorted(sel.items()) if e}


def _ranges(xs: list[int]) -> str:
    if xs and xs == list(range(xs[0], xs[-1] + 1)) and len(xs) > 2:
        return f"{xs[0]}..{xs[-1]}"
    return ", ".join(map(str, xs))


# ------------------------------------------------------------------------ ESFT
def shares(counts: torch.Tensor) -> torch.Tensor:
    """Rows normalised to sum to 1 (a layer that saw no token stays all zero)."""
    total = counts.sum(dim=1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1e-30), torch.zeros_like(counts))


def esft_select(scores: torch.Tensor, layers: Sequence[MoeLayer], threshold: float, max_per_layer: int) -> Selection:
    """Per layer, the fewest top-scoring experts whose cumulative share reaches `threshold`."""
    sel: Selection = {}
    for row, layer in zip(shares(scores), layers):
        row = row[: layer.num_experts]
        # Stable sort on (-score, index): equal scores go to the lower index, deterministically.
        order = sorted(range(layer.num_experts), key=lambda e: (-float(row[e]), e))
        chosen, cum = [], 0.0
        for e in order:
            if cum >= threshold or (max_per_layer and len(chosen) >= max_per_layer) or row[e] <= 0:
                break
            chosen.append(e)
            cum += float(row[e])
        sel[layer.index] = sorted(chosen)
    return sel


# ---------------------------------------------------------------------- sample
def stats_rows(run_cfg, tokenizer, max_tokens: int) -> list[dict[str, list[int]]]:
    """Packed, unpadded rows of up to `max_tokens` tokens from the run's data source."""
    from orchestrator.data.batching import pack
    from orchestrator.data.sft import SftTokenizer, to_messages
    from orchestrator.data.sources import as_dict, load_rows

    d = run_cfg.data
    raw = load_rows(d)
    random.Random(d.seed).shuffle(raw)
    enc = SftTokenizer(tokenizer, d.max_seq_len, truncate=True, train_on_prompt=True)
    examples, total = [], 0
    for row in raw:
        try:
            value = as_dict(row)
            try:
                ids = enc(to_messages(value, d.format))["input_ids"]
            except ValueError:  # no completion (e.g. a GRPO prompt): its prompt still routes
                msgs = value.get("messages") or value.get("prompt") or value["question"]
                msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs
                text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][: d.max_seq_len]
        except (ValueError, KeyError, TypeError):
            continue  # malformed rows are the stage's to report; here they just do not count
        ids = ids[: max_tokens - total]
        if len(ids) > 1:
            examples.append({"input_ids": ids, "labels": ids})
            total += len(ids)
        if total >= max_tokens:
            break
    if not examples:
        raise DataError(
            f"data.source={d.source!r}: no row could be rendered to measure router "
            "statistics for method=experts; give method.experts explicitly instead"
        )
    return [
        {"input_ids": r["input_ids"], "position_ids": r["position_ids"]} for r in pack(examples, d.max_seq_len, d.seed)
    ]


# ---------------------------------------------------------------- record / report
def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """The selection JSON and (for router selections) a heatmap PNG, in the run dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{SELECTION_FILE}.{os.getpid()}.tmp"  # rollout workers may write it too
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / SELECTION_FILE)
    if record.get("token_share"):
        (run_dir / HEATMAP_FILE).write_bytes(heatmap_png(record))


def read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SELECTION_FILE).read_text())
    except (OSError, ValueError):
        return None


def table(record: dict[str, Any]) -> str:
    experts = {int(k): v for k, v in record["experts"].items()}
    share = record.get(f"{record.get('score', 'token')}_share")
    lines = [
        f"method=experts: {sum(map(len, experts.values()))} experts selected "
        f"({record['source']}{', score ' + record['score'] if share else ''})"
    ]
    for i, layer in enumerate(record["layers"]):
        chosen = experts.get(layer, [])
        covered = f"  share {sum(share[i][e] for e in chosen):.2f}" if share else ""
        lines.append(f"  layer {layer:>3}: {len(chosen):>3} experts {chosen}{covered}")
    return "\n".join(lines)


def heatmap_png(record: dict[str, Any]) -> bytes:
    """Layers x experts, shade = score share (per-layer max = darkest); selected experts in
    orange, the rest in blue. Written by hand: no imaging library is a dependency."""
    share = record[f"{record.get('score', 'token')}_share"]
    cell = max(4, min(24, 1536 // max(len(share[0]), 1)))
    experts = {int(k): v for k, v in record["experts"].items()}
    selected = {(i, e) for i, layer in enumerate(record["layers"]) for e in experts.get(layer, [])}
    rows = []
    for i, layer_share in enumerate(share):
        top = max(layer_share) or 1.0
        line = bytearray()
        for e, s in enumerate(layer_share):
            t = s / top
            rgb = (
                (255, int(255 - 150 * t), int(255 - 255 * t))
                if (i, e) in selected
                else (int(255 - 225 * t), int(255 - 180 * t), 255)
            )
            line += bytes(rgb) * (cell - 1) + b"\xff\xff\xff"
        rows += [line] * (cell - 1) + [bytearray(b"\xff" * len(line))]
    width, height = len(rows[0]) // 3, len(rows)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


class LogExpertSelection:
    """Driver-side callback (`run.callbacks=[orchestrator.methods.experts:LogExpertSelection]`):
    at the first step it writes the selection table to the run log, and to W&B a table of
    every (layer, expert) score and the heatmap, when a W&B run is active."""

    def __init__(self, cfg):
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.done = False

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.done:
            return
        self.done = True
        record = read_record(self.run_dir)
        if record is None:
            return
        log.info("%s", table(record))
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        experts = {int(k): set(v) for k, v in record["experts"].items()}
        data = []
        for i, layer in enumerate(record["layers"]):
            for e in range(record["num_experts"]):
                data.append(
                    [
                        layer,
                        e,
                        *(record[k][i][e] if record.get(k) else None for k in ("token_share", "gate_share")),
                        e in experts.get(layer, ()),
                    ]
                )
        payload: dict[str, Any] = {
            "experts/selection": wandb.Table(
                columns=["layer", "expert", "token_share", "gate_share", "selected"], data=data
            )
        }
        if record.get("token_share"):
            png = base64.b64encode(heatmap_png(record)).decode()
            payload["experts/heatmap"] = wandb.Html(
                f'<img src="data:image/png;base64,{png}" style="image-rendering: pixelated; width: 100%">'
            )
        try:
            wandb.run.log(payload, step=step)
        except Exception as exc:  # W&B must never stop training
            log.warning("W&B: could not log the expert selection (%s)", exc)
