"""The changed weights of an experts run, as one flat dict (and a safetensors file).

Keys are the `transformers` parameter names of the model in memory (fused experts, e.g.
`model.layers.3.mlp.experts.gate_up_proj`):

* `NAME` [k, ...] with `NAME.expert_ids` [k] (int64): new values of experts `expert_ids`
  of the fused tensor NAME; its other experts are unchanged;
* `NAME` without `.expert_ids`: a whole parameter that trained (router, attention or shared
  experts, when those options are on).

`engine.trainable_state()` returns the same content under the training-time names
(`...experts.parametrizations.gate_up_proj.0.weight` / `.0.index`); `from_state_dict`
renames it, so weight sync to rollout sends only the selected slices.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

IDS = ".expert_ids"
FORMAT = "orchestrator.experts.delta/1"
_PARAMETRIZED = re.compile(r"^(.*)\.parametrizations\.([^.]+)\.0\.(weight|index)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def from_state_dict(
    state: Mapping[str, torch.Tensor], selection: Mapping[int, Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Training-time state (trainable params, and index buffers where the engine includes
    them, as FSDP2 does) -> delta keys. Missing indices come from `selection`
    ({decoder layer: experts}, the method's `selection`), e.g. for ZeRO-3's trainable_state."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _PARAMETRIZED.match(key)
        if m is None:
            out[key] = value
        else:
            name = f"{m.group(1)}.{m.group(2)}"
            out[name + IDS if m.group(3) == "index" else name] = value
    for key in [k for k in out if _PARAMETRIZED.match(k) is None and k not in state]:
        if key.endswith(IDS) or key + IDS in out:
            continue
        layer = _LAYER.search(key)
        if selection is None or layer is None:
            raise KeyError(f"{key}: expert slices without their indices; pass the selection")
        out[key + IDS] = torch.tensor(sorted(selection[int(layer.group(1))]), dtype=torch.long)
    return out


def from_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The delta of a model with the experts method applied, in the base parameters' dtype
    (so base + delta equals the merged export bit for bit)."""
    from torch.nn.utils import parametrize

    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            sel = plist[0]
            out[f"{path}.{name}"] = sel.weight.detach().to(plist.original.dtype).cpu().clone()
            out[f"{path}.{name}{IDS}"] = sel.index.detach().cpu().clone()
    for name, p in model.named_parameters():
        if p.requires_grad and ".parametrizations." not in name:
            out[name] = p.detach().cpu().clone()  # a copy: export later rewrites the params
    return out


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """Write `delta` into a plain `transformers` model in place (e.g. a rollout copy)."""
    params = dict(model.named_parameters())
    for key, value in delta.items():
        if key.endswith(IDS):
            continue
        if key not in params:
            raise KeyError(
                f"delta entry {key!r} is not a parameter of {type(model).__name__}; "
                "was the delta made for another architecture?"
            )
        target = params[key]
        ids = delta.get(key + IDS)
        if ids is None:
            target.copy_(value.to(target.dtype))
        else:
            target.index_copy_(0, ids.to(target.device), value.to(target.device, target.dtype))


def save(delta: dict[str, torch.Tensor], path: Path, base: str | None, selection: dict) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "base": base or "", "experts": json.dumps(selection)}
    save_file({k: v.contiguous() for k, v in delta.items()}, str(path), metadata=meta)


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != FORMAT:
        raise ValueError(f"{path} is not an experts delta (format {fmt!r}, expected {FORMAT!r})")
    return load_file(str(path))


def apply_to_dir(base: str, delta_path: Path, out: Path) -> Path:
    """Load the base with `transformers`, apply the delta, save a full model to `out`.

    Going through `from_pretrained`/`save_pretrained` keeps the on-disk layout the hub
    uses (transformers converts per-expert checkpoints to fused tensors on load and back on
    save), so the result loads wherever the base did. Needs the base in CPU memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    delta = load(delta_path)  # fail on a wrong file before reading a large base
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    apply_delta(model, delta)
    model.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    except (OSError, ValueError):  # a base without a tokenizer: the model alone is still complete
        pass
    return out
