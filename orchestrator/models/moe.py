"""Mixture-of-experts layout and router statistics, for any `transformers` MoE model.

transformers 5.x stores the experts of a layer fused in parameters with a leading expert
dimension (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I], plus
`*_bias` [E, ...] where present), in an experts module called as
`experts(hidden, top_k_index, top_k_weights)` (`@use_experts_implementation`). Qwen2/3-MoE,
Mixtral, OLMoE, DeepSeek-V2/V3, GPT-OSS (biases, transposed) and the rest share that layout, so nothing here is
specific to one family: an experts module is any module with a 3-D parameter whose first
dimension is its expert count. (No architecture in transformers 5.x keeps a per-expert
ModuleList any more; DBRX, which flattens experts into 2-D tensors, is not supported.)

Router statistics are read at the experts module's input (the routing the model really
uses, after its own top-k, normalisation or bias correction), not recomputed from logits.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoeLayer:
    index: int
    """Decoder layer index: the N in `...layers.N...`."""
    experts_path: str
    experts: nn.Module
    num_experts: int
    fused: list[str]
    """Names (on `experts`) of the parameters with a leading expert dimension."""
    router_params: list[str] = field(default_factory=list)
    """Full names of the router's parameters (the block's parameters outside experts/shared)."""
    shared_params: list[str] = field(default_factory=list)
    """Full names of shared-expert parameters (`shared_expert*` children of the block)."""


def shape(p: torch.Tensor) -> torch.Size:
    # Under ZeRO-3 a parameter is an empty placeholder and `ds_shape` is its real shape.
    return getattr(p, "ds_shape", p.shape)


def is_partitioned(model: nn.Module) -> bool:
    """Parameters partitioned by DeepSpeed ZeRO-3 (`zero.Init`): reading them needs a gather."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(params: list[torch.Tensor]):
    """Full values of `params` inside the block, on every rank (a collective under ZeRO-3)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def _num_experts(module: nn.Module) -> int | None:
    three_d = [shape(p) for p in module.parameters(recurse=False) if len(shape(p)) == 3]
    if not three_d:
        return None
    n = getattr(module, "num_experts", None)
    if isinstance(n, int) and all(s[0] == n for s in three_d):
        return n
    if type(module).__name__.endswith("Experts") and len({s[0] for s in three_d}) == 1:
        return three_d[0][0]
    return None


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every fused experts module of `model`, in order, with its router and shared experts."""
    out: list[MoeLayer] = []
    modules = dict(model.named_modules())
    for path, module in modules.items():
        n = _num_experts(module)
        if n is None:
            continue
        fused = [name for name, p in module.named_parameters(recurse=False) if len(shape(p)) >= 2 and shape(p)[0] == n]
        m = _LAYER.search(path + ".")
        layer = MoeLayer(int(m.group(1)) if m else len(out), path, module, n, fused)
        block_path, _, own = path.rpartition(".")
        block = modules.get(block_path)
        if block is not None:
            for name, _p in block.named_parameters():
                full = f"{block_path}.{name}"
                child = name.split(".")[0]
                if child == own:
                    continue
                (layer.shared_params if child.startswith("shared_expert") else layer.router_params).append(full)
        out.append(layer)
    return out


def attention_params(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if ".self_attn." in f".{name}"]


# How experts modules name their routing inputs (hidden, indices [T, k], weights [T, k]).
_ROUTING_ARGS = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))


def _routing_args(layer: MoeLayer) -> tuple[str, str] | None:
    params = list(inspect.signature(type(layer.experts).forward).parameters)[1:]
    for names in _ROUTING_ARGS:
        if list(names) == params[1:3]:
            return names
    return None


def routing_is_observable(layer: MoeLayer) -> bool:
    """Whether the experts module receives the routing (indices and weights) as inputs."""
    return _routing_args(layer) is not None


@contextlib.contextmanager
def _layers_streamed_to(model: nn.Module, device: torch.device):
    """Run a CPU model on `device` one transformer block at a time: blocks move in on their
    forward and out after it, so a model larger than the GPU can still be measured."""
    if device.type == "cpu":
        yield
        return
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inside = {id(m) for b in blocks for m in b.modules()}
    for m in model.modules():
        if id(m) not in inside:
            for _, p in m.named_parameters(recurse=False):
                p.data = p.data.to(device)
            for k, b in m.named_buffers(recurse=False):
                m._buffers[k] = b.to(device)
    hooks = [
        h
        for b in blocks
        for h in (
            b.register_forward_pre_hook(lambda mod, _a: mod.to(device)),
            b.register_forward_hook(lambda mod, _a, _o: mod.to("cpu")),
        )
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        model.to("cpu")


@contextlib.contextmanager
def _blocks_gathered(model: nn.Module):
    """Run a ZeRO-3-partitioned model before `deepspeed.initialize` installs its hooks: each
    transformer block is gathered for its forward only. Every rank must run the same forwards."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inside = {id(p) for b in blocks for p in b.parameters()}
    open_ctx: list[contextlib.ExitStack] = []

    def pre(mod, _args):
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(list(mod.parameters())))
        open_ctx.append(stack)

    hooks = [
        h
        for b in blocks
        for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(lambda *_: open_ctx.pop().close()))
    ]
    try:
        with gathered([p for p in model.parameters() if id(p) not in inside]):
            yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def router_statistics(
    model: nn.Module, rows: Iterable[dict[str, Sequence[int]]], device: torch.device = torch.device("cpu")
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward `rows` (each {input_ids, position_ids}, unpadded) and count, per MoE layer and
    expert, the tokens routed to it and the sum of its routing weights.

    Returns (token_counts [L, E], gate_sums [L, E], tokens seen); L follows moe_layers(model).
    """
    layers = moe_layers(model)
    n_exp = max(layer.num_experts for layer in layers)
    tokens = torch.zeros(len(layers), n_exp, dtype=torch.float64)
    gates = torch.zeros(len(layers), n_exp, dtype=torch.float64)

    def hook(i):
        idx_name, w_name = _routing_args(layers[i])

        def fn(_mod, args, kwargs):
            idx = kwargs[idx_name] if idx_name in kwargs else args[1]
            w = kwargs[w_name] if w_name in kwargs else args[2]
            idx, w = idx.reshape(-1).cpu(), w.reshape(-1).double().cpu()
            keep = idx < layers[i].num_experts  # expert-parallel sentinels, if any
            tokens[i].index_add_(0, idx[keep], torch.ones_like(w[keep]))
            gates[i].index_add_(0, idx[keep], w[keep])

        return fn

    handles = [layer.experts.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        placement = _blocks_gathered(model) if is_partitioned(model) else _layers_streamed_to(model, device)
        with placement:
            for row in rows:
                ids = torch.tensor([row["input_ids"]], device=device)
                pos = torch.tensor([row["position_ids"]], device=device)
                model.base_model(input_ids=ids, position_ids=pos, use_cache=False)
                seen += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return tokens, gates, seen


__all__ = [
    "MoeLayer",
    "attention_params",
    "gathered",
    "is_partitioned",
    "moe_layers",
    "router_statistics",
    "routing_is_observable",
    "shape",
]
