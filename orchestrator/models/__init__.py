"""Models and tokenizers: built locally from a `transformers` config, or loaded by hub id/path.

Everything goes through `transformers` Auto classes; a model family gets its own module
here only when it needs special handling (expert layout, parallelize plan).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from orchestrator.config.schema import ModelConfig
from orchestrator.errors import ModelLoadError
from orchestrator.models.kernels import attn_implementation
from orchestrator.models.tokenizer import CHAT_TEMPLATE, byte_tokenizer

BYTE_VOCAB = len(byte_tokenizer())


def _dense(m: ModelConfig) -> dict:
    """The settings the locally built dense architectures share (byte vocabulary, sizes)."""
    return dict(
        vocab_size=BYTE_VOCAB,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
    )


def _llama(m: ModelConfig) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**_dense(m))


def _qwen2(m: ModelConfig) -> PretrainedConfig:
    """Qwen2: Llama-like, with biases on the attention q/k/v projections."""
    from transformers import Qwen2Config

    return Qwen2Config(**_dense(m))


def _qwen3_moe(m: ModelConfig) -> PretrainedConfig:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        moe_intermediate_size=m.moe_intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.hidden_size // m.num_heads,
        num_experts=m.num_experts or 8,
        num_experts_per_tok=m.num_experts_per_tok,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
    )


# Locally built architectures (model.arch), for offline runs and tests.
ARCHITECTURES: dict[str, Callable[[ModelConfig], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3_moe": _qwen3_moe,
}

_OFFLINE_HINT = (
    "If this machine has no access to the Hugging Face Hub, point {key} at a local directory "
    "(e.g. one made by `huggingface-cli download {name}` on a machine with access) and set "
    "HF_HUB_OFFLINE=1, or use a locally built model (model=tiny_llama / debug=cpu)."
)


def master_dtype(m: ModelConfig) -> torch.dtype:
    """The dtype the engines store weights in: fp32 master weights unless model.dtype says."""
    return torch.float32 if m.dtype == "auto" else getattr(torch, m.dtype)


def resolve_dtype(m: ModelConfig, on_gpu: bool) -> torch.dtype:
    if m.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, m.dtype)


def build_tokenizer(m: ModelConfig):
    """The tokenizer for `m`, with a chat template and a pad token."""
    name = m.tokenizer or m.pretrained
    if name is None:
        tok = byte_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load tokenizer '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                + _OFFLINE_HINT.format(key="model.tokenizer / model.pretrained", name=name)
            ) from exc
    if m.chat_template:
        tok.chat_template = m.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(m: ModelConfig) -> PretrainedConfig:
    """The `transformers` config of `m` (fetches only config.json for hub models)."""
    if m.pretrained is None:
        return ARCHITECTURES[m.arch](m)
    try:
        return AutoConfig.from_pretrained(m.pretrained, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model '{m.pretrained}' ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            + _OFFLINE_HINT.format(key="model.pretrained", name=m.pretrained)
        ) from exc


def auto_class(head: str) -> tuple[type, dict]:
    """The `transformers` Auto class of a head: `lm` (causal LM), `score` (one scalar per
    sequence, read at the last non-pad token: reward models), `value` (one scalar per token:
    critics)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    heads = {
        "lm": (AutoModelForCausalLM, {}),
        "score": (AutoModelForSequenceClassification, {"num_labels": 1}),
        "value": (AutoModelForTokenClassification, {"num_labels": 1}),
    }
    if head not in heads:
        raise ValueError(f"unknown model head {head!r}: use one of {', '.join(heads)}")
    return heads[head]


def head_kwargs(m: ModelConfig, head: str) -> tuple[type, dict]:
    """`auto_class(head)`, and for a `score` head the tokenizer's pad id in the config:
    `transformers` pools a sequence-classification batch at each row's last non-pad token
    and refuses batches when the config has no pad id (a base without one, e.g. Llama 3)."""
    auto, extra = auto_class(head)
    if head == "score":
        extra = dict(extra, pad_token_id=build_tokenizer(m).pad_token_id)
    return auto, extra


def build_model(m: ModelConfig, dtype: torch.dtype, head: str = "lm", packed_rows: bool = True) -> torch.nn.Module:
    """A full (unsharded) model on CPU: random init (seeded, identical on every rank) or pretrained,
    with a causal LM head or a scalar head (`auto_class`). `packed_rows=False` for a model that
    only generates (`model.attn_implementation=auto` then picks no packing kernel)."""
    auto, extra = head_kwargs(m, head)
    # A worker without a GPU sees none (Ray hides the node's GPUs from it).
    attn = attn_implementation(str(m.attn_implementation), torch.cuda.is_available(), packed_rows)
    if m.pretrained is None:
        cfg = model_config(m)
        cfg._attn_implementation = attn
        for key, value in extra.items():
            setattr(cfg, key, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.init_seed)
            model = auto.from_config(cfg, dtype=dtype, attn_implementation=attn)
        return model
    try:
        return auto.from_pretrained(
            m.pretrained,
            revision=m.revision,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=m.trust_remote_code,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model weights '{m.pretrained}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}). " + _OFFLINE_HINT.format(key="model.pretrained", name=m.pretrained)
        ) from exc


__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "build_model",
    "build_tokenizer",
    "head_kwargs",
    "model_config",
    "master_dtype",
    "resolve_dtype",
]
