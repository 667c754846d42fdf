"""Model shapes for the plan: the `transformers` config and parameter counts, weights never loaded.

The model is built on the meta device (`torch.device("meta")`: shapes, no storage) from its
config, and the run's method is applied to it, so parameter and trainable counts are exact
for any architecture `transformers` knows. Hub models whose config cannot be fetched (an
offline machine) fall back to the published `config.json` values of the models the config
tree names (KNOWN_CONFIGS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from orchestrator.errors import ModelLoadError

_QWEN25_05B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
_QWEN25_15B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
_QWEN25_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
_LLAMA31_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
# Published config.json values (the fields that set parameter and activation sizes).
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "Qwen/Qwen3-30B-A3B": dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
}


def hf_config(m) -> PretrainedConfig:
    """The `transformers` config of model spec `m`: built locally, a local directory, the
    published values of a known hub id, or fetched (config.json only)."""
    from orchestrator.models import model_config

    if m.pretrained is None or Path(m.pretrained).is_dir() or m.pretrained not in KNOWN_CONFIGS:
        return model_config(m)
    values = dict(KNOWN_CONFIGS[m.pretrained])
    return AutoConfig.for_model(values.pop("model_type"), **values)


@dataclass
class Shapes:
    """What the memory model reads of a model: sizes from its config, counts from a meta build."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    """Intermediate width one token passes through per layer (MoE: experts per token x expert width)."""
    params: int
    """All parameters."""
    block_params: int
    """Parameters of the largest decoder block (what FSDP2 / ZeRO-3 gather at once)."""
    root_params: int
    """Parameters outside the decoder blocks (embeddings, final norm, LM head)."""
    largest_module: int
    """Parameters of the largest single module (ZeRO-3 gathers per module)."""
    linear_params: int
    """Weights of the linear layers inside the blocks (what a 4-bit base quantizes)."""
    active_params: int
    """Parameters one token touches (MoE: only its routed experts), for FLOPs."""
    trainable: int
    """Parameters the run's method trains."""
    expert_params: int = 0
    """Parameters of the routed experts, all layers (0: a dense model)."""

    @property
    def base_trained(self) -> bool:
        """Whether every weight of the base model trains (full fine-tuning): norms and linears
        then keep their inputs for their weights' gradients."""
        return self.trainable >= self.params


def _moe(cfg: PretrainedConfig) -> tuple[int, int]:
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
    return int(experts), int(getattr(cfg, "num_experts_per_tok", 0) or 0)


def meta_model(cfg: PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and "Layer" in type(mod[0]).__name__:
            return list(mod)
    raise ModelLoadError(f"{type(model).__name__}: no list of decoder layers found to plan with")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _trainable(model: torch.nn.Module, method_cfg, experts: int) -> int:
    """Trainable parameters of `model` under the run's method (applied on meta)."""
    from orchestrator.methods import METHODS
    from orchestrator.methods.lora import Lora

    name = method_cfg.name
    if name == "experts":
        # The selection may come from router statistics on the data (known only at run time):
        # plan for the explicit list, else for the share `threshold` of each layer's experts.
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith("experts"))
        sel = method_cfg.experts
        if isinstance(sel, (list, tuple)) and experts:
            share = len(sel) / experts
        elif isinstance(sel, dict) and experts:
            share = sum(len(v) for v in sel.values()) / (experts * max(len(_blocks(model)), 1))
        else:
            share = method_cfg.threshold
        return int(expert_params * share)
    cls = Lora if name == "qlora" else METHODS[name]
    model = cls(method_cfg).apply(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def shapes(m, method_cfg) -> Shapes:
    """Shapes of model spec `m` with method `method_cfg` applied."""
    cfg = hf_config(m)
    model = meta_model(cfg)
    blocks = _blocks(model)
    params = _count(model)
    block = max(_count(b) for b in blocks)
    largest = max(_count(mod) for mod in model.modules() if not list(mod.children()))
    linear = sum(mod.weight.numel() for b in blocks for mod in b.modules() if isinstance(mod, torch.nn.Linear))
    experts, per_tok = _moe(cfg)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    expert_params = 0
    if experts:
        width = per_tok * (getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = params - expert_params + expert_params * per_tok // experts
    else:
        width, active = cfg.intermediate_size, params
    trainable = _trainable(model, method_cfg, experts)
    return Shapes(
        vocab=cfg.vocab_size,
        hidden=hidden,
        layers=len(blocks),
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        mlp_width=width,
        params=params,
        block_params=block,
        root_params=params - sum(_count(b) for b in blocks),
        largest_module=largest,
        linear_params=linear,
        active_params=active,
        trainable=trainable,
        expert_params=expert_params,
    )
