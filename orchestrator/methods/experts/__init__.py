"""MoE expert-targeted training (`method=experts`): only chosen experts train.

Selection (see `selection.py`): explicit indices (`method.experts=[1,3]` for every MoE
layer, `{0: [1,3], 5: [0]}` per decoder layer, or a selection JSON), or automatic from
router statistics on the training data, following ESFT (Wang et al., arXiv:2407.01906):
per layer, the top experts by token share (ESFT-Token) or gate-weight share (ESFT-Gate)
until their cumulative share reaches `threshold`, at most `max_per_layer`.

Where statistics are measured: inside `apply`, on the base model before sharding, with
the run's own data source (`selection.stats_rows`). Under FSDP2 every rank holds the full
model there and rank 0 measures alone (on GPU, streaming it to the device block by block);
under ZeRO-3 the model is already partitioned, so every rank runs the same forwards with
each block gathered in turn. Rank 0's result is broadcast, so every rank builds an
identical structure, and written to `<run dir>/experts_selection.json` (+ `.png` heatmap;
`LogExpertSelection` puts the table in the run log and W&B). A resumed run reuses that
file; FSDP2 checkpoints also carry the chosen indices as buffers.

How only those experts train: transformers 5.x fuses a layer's experts into 3-D
parameters, so there is no per-expert `requires_grad`. Each fused parameter of a layer with
selected experts is re-parametrised (`torch.nn.utils.parametrize`): the original tensor
stays as a frozen parameter and a small trainable parameter holds the selected experts'
slices (fp32 when the base is bf16/fp16, as master weights); the module sees
`base.index_copy(0, selected, slices)`. So the optimizer holds state only for the slices,
unselected experts can never change, and FSDP2 / ZeRO-3 shard both parameters like any
other. Engines checkpoint the trainable slices and the index buffers (frozen parameters are
rebuilt from the model source). Cost: the merged tensor of a layer lives from its forward
to its backward; with `backend.activation_checkpointing=true` that is one layer at a time
(the 30B recipe turns it on). With `train_router/attention/shared_experts` those
parameters train whole.

Export: `export/hf` is the merged model under the usual parameter names (loads in
transformers/vLLM), `export/experts_delta.safetensors` holds only the changed slices (see
`delta.py`; `python -m orchestrator.methods.experts apply` rebuilds the model from a base),
and `export/base` the base when it was built locally. GRPO's reference model is the base:
while only experts train, `reference_context` switches the slices off (no second copy);
with whole modules training too, the reference is a frozen copy (a `reference` role).
Weight sync to rollout sends the merged fused tensors under their `transformers` names.

Not done: LoRA on the selected experts (full slices are already small; adapters on 3-D
slices would need a custom layer), per-expert ModuleList layouts (none left in
transformers 5.x) and DBRX's flattened experts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from orchestrator.errors import ConfigError
from orchestrator.methods.base import Method, Reference
from orchestrator.methods.experts import delta as delta_io
from orchestrator.methods.experts.selection import (
    SELECTION_FILE,
    LogExpertSelection,
    Selection,
    esft_select,
    parse_explicit,
    read_record,
    shares,
    stats_rows,
    table,
    write_record,
)
from orchestrator.models.moe import (
    MoeLayer,
    attention_params,
    gathered,
    is_partitioned,
    moe_layers,
    router_statistics,
    routing_is_observable,
)

log = logging.getLogger(__name__)
SCORES = ("token", "gate")


class ExpertSlices(nn.Module):
    """Parametrization of a fused expert tensor: the frozen base with the selected experts'
    slices replaced by a trainable copy."""

    def __init__(self, base: torch.Tensor, experts: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(experts, dtype=torch.long, device=base.device))
        dtype = torch.float32 if base.dtype in (torch.bfloat16, torch.float16) else base.dtype
        self.weight = nn.Parameter(base.detach()[self.index].to(dtype).clone())
        self.enabled = True

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return base
        return base.index_copy(0, self.index, self.weight.to(base.dtype))


# ------------------------------------------------------------------ config checks
def _meta_model(cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from orchestrator.models import model_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(cfg.model), trust_remote_code=cfg.model.trust_remote_code)


def check_config(cfg) -> None:
    """Everything about `method=experts` that can be checked before any worker starts,
    against the model's real structure (built on the meta device: no weights, no memory)."""
    c = cfg.method
    if c.score not in SCORES:
        raise ConfigError(f"method.score={c.score!r} is not valid. Valid values: {', '.join(SCORES)}")
    if not 0 < c.threshold <= 1:
        raise ConfigError(f"method.threshold={c.threshold} must be in (0, 1]")
    if c.max_per_layer < 0 or c.stats_tokens <= 0:
        raise ConfigError(
            f"method.max_per_layer={c.max_per_layer} must be >= 0 and method.stats_tokens={c.stats_tokens} > 0"
        )
    model = _meta_model(cfg)
    check_model(c, model, cfg.model.pretrained or f"{cfg.model.name} (arch {cfg.model.arch})")


def check_model(c, model: nn.Module, label: str) -> list[MoeLayer]:
    layers = moe_layers(model)
    if not layers:
        raise ConfigError(
            f"method=experts needs a mixture-of-experts model, but model {label} has no experts "
            "(no fused expert parameters found). Use an MoE model (model=tiny_moe, qwen3_30b_a3b, "
            "mixtral_8x7b), or method=full / method=lora for dense models."
        )
    if c.experts is not None:
        parse_explicit(c.experts, layers)
    elif not all(routing_is_observable(layer) for layer in layers):
        raise ConfigError(
            f"method=experts: the routing of {type(layers[0].experts).__name__} cannot be "
            "observed, so experts cannot be chosen from router statistics; give "
            "method.experts explicitly"
        )
    if c.train_shared_experts and not any(layer.shared_params for layer in layers):
        raise ConfigError(f"method.train_shared_experts=true but model {label} has no shared experts")
    if c.train_attention and not attention_params(model):
        raise ConfigError(f"method.train_attention=true but model {label} has no `self_attn` modules")
    return layers


# ------------------------------------------------------------------------ method
_ORIGINAL = re.compile(r"^(.*)\.parametrizations\.([^.]+)\.original$")


class Experts(Method):
    def __init__(self, cfg, context=None):
        super().__init__(cfg, context)
        self.run_cfg = context
        """The role spec (`orchestrator.roles.RoleSpec`): model, data and run dir for router
        statistics (None in bare use)."""
        self.selection: Selection | None = None
        self.record: dict[str, Any] | None = None
        self.base_whole: dict[str, torch.Tensor] | None = None
        """Initial values of whole-trained parameters, for exporting a locally built base."""

    # ------------------------------------------------------------------ apply
    def apply(self, model: nn.Module) -> nn.Module:
        layers = check_model(self.cfg, model, type(model).__name__)
        if self.selection is None:  # first call; the export skeleton reuses the choice
            self.selection = self._select(model, layers)
        model.requires_grad_(False)
        slices = []
        for layer in layers:
            chosen = self.selection.get(layer.index)
            if not chosen:
                continue
            for name in layer.fused:
                base = getattr(layer.experts, name)
                with gathered([base]):  # ZeRO-3: the slices are copied from the full tensor
                    sel = ExpertSlices(base, chosen)
                parametrize.register_parametrization(layer.experts, name, sel, unsafe=True)
                slices.append(sel)
        whole = self._whole_params(model, layers)
        params = dict(model.named_parameters())
        if whole and self.base_whole is None and (self.run_cfg is None or self.run_cfg.model.pretrained is None):
            # A locally built base cannot be re-read from disk at export: keep what will change.
            self.base_whole = {}
            keep = not _distributed() or dist.get_rank() == 0  # only rank 0 exports
            for name in whole:
                with gathered([params[name]]):  # a collective under ZeRO-3: every rank enters
                    if keep:
                        self.base_whole[name] = params[name].detach().cpu().clone()
        for name in whole:
            params[name].requires_grad_(True)
        # Only slices train: the frozen originals are the base, i.e. the reference policy.
        model._orchestrator_expert_slices = slices  # type: ignore[assignment]
        return model

    @property
    def reference(self) -> Reference:  # type: ignore[override]
        c = self.cfg
        whole = c.train_router or c.train_attention or c.train_shared_experts
        return Reference.FROZEN_COPY if whole else Reference.WEIGHTS_OFF

    def reference_context(self, model: nn.Module):
        if self.reference is not Reference.WEIGHTS_OFF:
            return super().reference_context(model)
        return _disabled(model._orchestrator_expert_slices)

    def hf_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each parametrised fused tensor merged (base with the trained slices written in) under
        its `transformers` name; whole-trained parameters as they are."""
        out: dict[str, torch.Tensor] = {}
        whole = self.reference is Reference.FROZEN_COPY
        for key, value in state.items():
            m = _ORIGINAL.match(key)
            if m is not None:
                path, name = m.groups()
                slices = state[f"{path}.parametrizations.{name}.0.weight"]
                index = state.get(f"{path}.parametrizations.{name}.0.index")
                if index is None:  # ZeRO-3 state dicts carry parameters only
                    index = torch.tensor(self._layer_experts(path), dtype=torch.long)
                out[f"{path}.{name}"] = value.index_copy(0, index, slices.to(value.dtype))
            elif whole and ".parametrizations." not in key:
                out[key] = value
        return out

    def _layer_experts(self, path: str) -> list[int]:
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
        if layer is None or self.selection is None:
            raise KeyError(f"{path}: expert slices without their indices")
        return sorted(self.selection[int(layer.group(1))])

    def _whole_params(self, model: nn.Module, layers: list[MoeLayer]) -> list[str]:
        c, names = self.cfg, []
        for layer in layers:
            names += (layer.router_params if c.train_router else []) + (
                layer.shared_params if c.train_shared_experts else []
            )
        return names + (attention_params(model) if c.train_attention else [])

    # -------------------------------------------------------------- selection
    def _select(self, model: nn.Module, layers: list[MoeLayer]) -> Selection:
        rank = dist.get_rank() if _distributed() else 0
        # Rank 0 decides (explicit, or a saved record) and measures; under ZeRO-3 every rank
        # takes part in the measuring forwards, whose parameter gathers are collectives.
        record = _from_rank0(lambda: self._known_record(layers) if rank == 0 else None)
        if record is None:
            measure = rank == 0 or is_partitioned(model)
            record = _from_rank0(lambda: self._measure(model, layers) if measure else None)
        self.record = record
        if rank == 0:
            print(table(record), flush=True)
            if self.run_dir is not None and read_record(self.run_dir) != record:
                write_record(self.run_dir, record)
        return {int(k): v for k, v in record["experts"].items() if v}

    @property
    def run_dir(self) -> Path | None:
        if self.run_cfg is None or self.run_cfg.run_dir is None:
            return None
        return Path(self.run_cfg.run_dir).resolve()

    def _request(self) -> dict[str, Any]:
        """What determines the selection; a saved record is reused only if this matches."""
        c, r = self.cfg, self.run_cfg
        req = {
            "experts": c.experts,
            "score": c.score,
            "threshold": c.threshold,
            "max_per_layer": c.max_per_layer,
            "stats_tokens": c.stats_tokens,
        }
        if r is not None:
            req.update(model=r.model.pretrained or r.model.name, data=r.data.source, seed=r.data.seed)
        return json.loads(json.dumps(req))

    def _base_record(self, layers: list[MoeLayer]) -> dict[str, Any]:
        return {
            "request": self._request(),
            "layers": [layer.index for layer in layers],
            "num_experts": max(layer.num_experts for layer in layers),
        }

    def _known_record(self, layers: list[MoeLayer]) -> dict[str, Any] | None:
        """The explicit selection, or the one saved in the run dir for the same request."""
        base = self._base_record(layers)
        if self.cfg.experts is not None:
            sel = parse_explicit(self.cfg.experts, layers)
            return {
                "source": "explicit",
                **base,
                "experts": {str(layer.index): sel.get(layer.index, []) for layer in layers},
            }
        saved = read_record(self.run_dir) if self.run_dir is not None else None
        if saved is not None and saved.get("request") == base["request"]:
            log.info("method=experts: reusing the selection in %s", self.run_dir / SELECTION_FILE)
            return saved
        if saved is not None:
            log.warning(
                "method=experts: the selection settings differ from %s; choosing again (a "
                "checkpoint saved with the old choice will not load)",
                self.run_dir / SELECTION_FILE,
            )
        return None

    def _measure(self, model: nn.Module, layers: list[MoeLayer]) -> dict[str, Any]:
        c, base = self.cfg, self._base_record(layers)
        if self.run_cfg is None:
            raise ConfigError(
                "method=experts without method.experts chooses experts from the "
                "training data, which needs the role spec (Experts(cfg, spec))"
            )
        from orchestrator.models import build_tokenizer

        rows = stats_rows(self.run_cfg, build_tokenizer(self.run_cfg.model), c.stats_tokens)
        use_gpu = self.run_cfg.cluster.gpus_per_worker > 0 and torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        tokens, gates, seen = router_statistics(model, rows, device)
        sel = esft_select(tokens if c.score == "token" else gates, layers, c.threshold, c.max_per_layer)
        return {
            "source": "router",
            **base,
            "score": c.score,
            "threshold": c.threshold,
            "max_per_layer": c.max_per_layer,
            "stats_tokens": seen,
            "experts": {str(k): v for k, v in sel.items()},
            "token_share": _rounded(shares(tokens)),
            "gate_share": _rounded(shares(gates)),
        }

    # ----------------------------------------------------------------- export
    def export(self, model: nn.Module, out_dir: Path, tokenizer, base_ref: str | None) -> dict[str, str]:
        out: dict[str, str] = {}
        delta = delta_io.from_model(model)
        whole = [k for k in delta if k + delta_io.IDS not in delta and not k.endswith(delta_io.IDS)]
        # A locally built base (no hub id or directory to point at) is written beside the
        # delta. It is the model's own frozen originals plus the saved initial values of
        # whole-trained parameters, i.e. exactly what training started from on any backend.
        write_base = base_ref is None and (not whole or self.base_whole is not None)
        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations):
                    module.parametrizations[name][0].enabled = not write_base
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        if write_base:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in (self.base_whole or {}).items():
                    params[name].copy_(value)
            model.save_pretrained(out_dir / "base")
            tokenizer.save_pretrained(out_dir / "base")
            base_ref = str((out_dir / "base").resolve())
            out["base"] = str(out_dir / "base")
            delta_io.apply_delta(model, delta)
        hf = out_dir / "hf"
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        out["model"] = str(hf)
        path = out_dir / "experts_delta.safetensors"
        delta_io.save(delta, path, base_ref, {str(k): v for k, v in (self.selection or {}).items()})
        out["delta"] = str(path)
        return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _from_rank0(compute) -> Any:
    """compute() here, then rank 0's result everywhere. An exception on rank 0 is raised on
    every rank, so none is left waiting in a collective."""
    try:
        value: Any = compute()
    except Exception as exc:
        value = exc
    if _distributed():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    if isinstance(value, Exception):
        raise value
    return value


@contextlib.contextmanager
def _disabled(slices: list[ExpertSlices]):
    for s in slices:
        s.enabled = False
    try:
        yield
    finally:
        for s in slices:
            s.enabled = True


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in t]


__all__ = ["Experts", "LogExpertSelection", "ExpertSlices", "check_config", "delta_io"]
