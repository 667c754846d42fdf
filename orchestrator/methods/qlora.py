"""QLoRA (Dettmers et al., arXiv:2305.14314): LoRA adapters on a frozen 4-bit base.

The base loads through `transformers`' bitsandbytes integration (`BitsAndBytesConfig`):
every linear layer except the output head becomes a `bitsandbytes` `Linear4bit` holding
NF4 (or FP4) codes with blockwise absmax scales (themselves quantized with double
quantization). A hub id or local checkpoint is quantized while it loads; a locally built
model is built in float with its seeded init, written to a temporary directory and read
back quantized, so both go through the same loader. peft's `prepare_model_for_kbit_training`
then freezes the base and upcasts the remaining half-precision weights (norms, embeddings)
to fp32, and `Lora.apply` adds the adapters.

DoRA (`method.use_dora`) and rsLoRA (`method.use_rslora`) apply as on `lora`; PiSSA and
OLoRA inits are refused (they rewrite the base weights, which are 4-bit here).

Deviations from the paper: no paged optimizers (the optimizer state is only the adapters'
and is sharded by the backend); the compute dtype follows the device (bf16 on GPU, fp32
on CPU) unless `method.compute_dtype` says otherwise.

What leaves the trainer is float: weight sync (`hf_weights`) sends every 4-bit layer
de-quantized to the base dtype, with the adapter merged in where the layer is adapted, so
a plain float model loading them computes what the QLoRA policy computes (up to float
rounding). Export writes the PEFT adapter, beside the de-quantized base when the base was
built locally, and with `export_merged` the de-quantized base with the adapter merged in;
neither carries a quantization config, so both load in plain `transformers`.

Sharding: with FSDP2 each rank keeps 1/N of the packed 4-bit weights, which are gathered
as stored (the engine never casts them to the compute dtype; a cast would destroy the
codes). The quantization constants stay on the layer (`Linear4bit.quant_state`), from where
bitsandbytes re-attaches them to the gathered weight. Under DeepSpeed ZeRO-3 (transformers'
zero.Init integration) the 4-bit weights load empty here, so validation refuses that
combination and names backend=fsdp2.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from orchestrator.errors import ConfigError, ModelLoadError
from orchestrator.methods.lora import RESIDUAL_INITS, Lora, _hf_name

INSTALL_HINT = 'pip install -e ".[qlora]"'
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def require_bitsandbytes() -> None:
    """One clear error when `bitsandbytes` is missing, naming the extra to install."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"method=qlora needs bitsandbytes (4-bit NF4/FP4 layers), which is not installed. "
            f"Install the extra: {INSTALL_HINT}, or use method=lora (a float base)."
        )


def check_config(cfg) -> None:
    """What `method=qlora` needs of the rest of the run (called by QloraMethodConfig.check)."""
    init = str(cfg.method.init_lora_weights)
    if init in RESIDUAL_INITS:
        raise ConfigError(
            f"method.init_lora_weights={init} with method=qlora: {init} decomposes each float base weight and "
            "writes the residual back into the base, which here holds 4-bit codes (not supported). "
            f"Use method=lora for {init}, or method.init_lora_weights=default|gaussian with qlora."
        )
    require_bitsandbytes()
    if cfg.backend.name == "deepspeed_zero3":
        raise ConfigError(
            "method=qlora with backend=deepspeed_zero3: ZeRO-3 partitions every parameter while the model is "
            "built (zero.Init), and bitsandbytes' 4-bit weights do not survive that (the base loads empty). "
            "Use backend=fsdp2, which shards the 4-bit base (each rank keeps 1/N of the packed weights)."
        )
    experts = _moe_experts(cfg.model)
    if experts:
        raise ConfigError(
            f"method=qlora on model {cfg.model.name!r} ({experts}): bitsandbytes quantizes nn.Linear layers "
            "only, and transformers stores MoE experts as fused 3-D tensors, which would silently stay in full "
            "precision. Use method=lora or method=experts for MoE models."
        )


def _moe_experts(m) -> str:
    """'num_experts=8' when the model is a mixture of experts, '' otherwise (or unknown)."""
    from orchestrator.models import model_config

    try:
        config = model_config(m)
    except ModelLoadError:
        return ""  # unreachable config: the load reports it, with the offline hint
    config = getattr(config, "text_config", None) or config
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return f"{key}={getattr(config, key)}"
    return ""


class Qlora(Lora):
    """LoRA on a 4-bit base: `load_base` quantizes, everything LoRA does stays LoRA's."""

    def __init__(self, cfg, context=None):
        super().__init__(cfg, context)
        self.quant_states: dict[str, object] = {}
        """CPU copies of each 4-bit layer's quantization constants, by HF module name."""
        self.base_dtype = torch.float32
        """The float dtype of the base (what de-quantized weights are returned in)."""

    # ----------------------------------------------------------------- build
    def quantization_config(self, dtype: torch.dtype):
        """The `BitsAndBytesConfig` of `method.*` for a base whose float dtype is `dtype`."""
        from transformers import BitsAndBytesConfig

        c = self.cfg
        compute = (
            (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
            if c.compute_dtype == "auto"
            else _DTYPES[str(c.compute_dtype)]
        )
        # Float storage by default: the packed bytes then share the other parameters' dtype,
        # which sharding backends expect.
        storage = dtype if c.quant_storage == "auto" else _DTYPES[str(c.quant_storage)]
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=str(c.quant_type),
            bnb_4bit_use_double_quant=c.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=storage,
        )

    def load_base(self, model_spec, dtype: torch.dtype, head: str = "lm") -> torch.nn.Module:
        require_bitsandbytes()
        from peft import prepare_model_for_kbit_training

        qconfig = self.quantization_config(dtype)
        if model_spec.pretrained is None:
            from orchestrator.models import build_model

            with tempfile.TemporaryDirectory(prefix="qlora_base_") as tmp:
                _save_local(build_model(model_spec, dtype, head), tmp)  # seeded init, then quantized on load
                model = _from_pretrained(tmp, model_spec, dtype, qconfig, head)
        else:
            model = _from_pretrained(model_spec.pretrained, model_spec, dtype, qconfig, head)
        self.base_dtype = dtype
        self._record_quant_states(model)
        backend = getattr(self.context, "backend", None)
        checkpointing = bool(getattr(backend, "activation_checkpointing", False))
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def _record_quant_states(self, model: torch.nn.Module) -> None:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weight in place the
                # first time it runs in eval mode without grad, into another shape and a bf16
                # kernel: sharded all-gathers would then disagree with the stored shard, and
                # eval log-probs with training ones. Keep the one layout.
                module.support_avx512bf16_for_cpu = False
                qs = module.weight.quant_state
                self.quant_states[name] = QuantState.from_dict(qs.as_dict(packed=True), device=torch.device("cpu"))

    def quantized_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        import bitsandbytes as bnb

        return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]

    def memory_stats(self, model: torch.nn.Module) -> dict[str, int]:
        """Bytes of the 4-bit base (codes + quantization constants): in all, on this rank (a
        sharded base keeps 1/N of the codes; the constants are on every rank), and the same
        weights in bf16 and fp32."""
        total = rank = numel = 0
        for module in self.quantized_modules(model):
            w = module.weight
            local = w.to_local() if hasattr(w, "to_local") else w
            consts = sum(t.numel() * t.element_size() for t in _constants(module.quant_state))
            total += w.numel() * w.element_size() + consts
            rank += local.numel() * local.element_size() + consts
            numel += module.quant_state.shape.numel()
        return {
            "base_4bit_bytes": total,
            "base_4bit_rank_bytes": rank,
            "base_bf16_bytes": 2 * numel,
            "base_fp32_bytes": 4 * numel,
        }

    # ------------------------------------------------------------- inference
    def float_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training-time state dict with every 4-bit weight de-quantized to the base dtype
        ([out, in], as a float model holds it) and the quantization constants dropped."""
        from bitsandbytes.functional import dequantize_4bit

        out: dict[str, torch.Tensor] = {}
        quantized: set[str] = set()
        for key, value in state.items():
            layer = _hf_name(key)[: -len(".weight")] if key.endswith(".weight") else None
            if layer in self.quant_states:
                packed = value.detach().to("cpu").contiguous()
                out[key] = dequantize_4bit(packed, self.quant_states[layer]).to(self.base_dtype)
                quantized.add(key)
            else:
                out[key] = value
        # Linear4bit writes its constants as `<weight key>.absmax`, `.quant_map`, ...
        return {k: v for k, v in out.items() if not any(k.startswith(q + ".") for q in quantized)}

    def hf_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every 4-bit layer de-quantized (with the adapter merged where it is adapted), under
        HF names: the rollout model loads the base the policy really computes with."""
        if not state:
            return {}
        floats = self.float_state(state)
        out = super().hf_weights(floats)
        for key, value in floats.items():
            name = _hf_name(key)
            if name.endswith(".weight") and name[: -len(".weight")] in self.quant_states and name not in out:
                out[name] = value  # a 4-bit layer without an adapter: its de-quantized weight
        return out

    def export(self, model, out_dir: Path, tokenizer, base_ref) -> dict[str, str]:
        """The float model `float_state` made (a de-quantized base + adapters), written as
        LoRA writes it, without the quantization config (it is not 4-bit any more)."""
        from orchestrator.methods.base import unwrap

        config = unwrap(model).config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        return super().export(model, out_dir, tokenizer, base_ref)


def _save_local(model: torch.nn.Module, path: str) -> None:
    """`model` as a checkpoint directory, written by this rank (`save_pretrained` writes on
    rank 0 only once torch.distributed is up, and every rank loads its own copy)."""
    from safetensors.torch import save_model

    model.config.save_pretrained(path)
    save_model(model, f"{path}/model.safetensors", metadata={"format": "pt"})


def _from_pretrained(path: str, m, dtype: torch.dtype, qconfig, head: str) -> torch.nn.Module:
    from orchestrator.models import _OFFLINE_HINT, head_kwargs
    from orchestrator.models.kernels import attn_implementation

    auto, extra = head_kwargs(m, head)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    try:
        return auto.from_pretrained(
            path,
            revision=m.revision if m.pretrained else None,
            dtype=dtype,
            quantization_config=qconfig,
            device_map={"": device},  # bitsandbytes quantizes as the weights land on the device
            attn_implementation=attn_implementation(str(m.attn_implementation), torch.cuda.is_available()),
            trust_remote_code=m.trust_remote_code,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model weights '{path}' in 4-bit ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}). " + _OFFLINE_HINT.format(key="model.pretrained", name=path)
        ) from exc


def _constants(qs) -> list[torch.Tensor]:
    """The tensors of a `QuantState`: block absmax and code book, and with double quantization
    the absmax' own absmax, code book and offset."""
    out = [qs.absmax, qs.code]
    if qs.nested:
        out += [qs.state2.absmax, qs.state2.code, qs.offset]
    return [t for t in out if torch.is_tensor(t)]
