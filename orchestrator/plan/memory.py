"""Memory per device of each role of a run, by component, from shapes alone.

Model state (N = cluster.num_workers; FSDP2 and ZeRO-3 shard all of it over N):

- parameters: stored in the engine's master dtype (fp32 unless `model.dtype` says; DeepSpeed
  with bf16 keeps bf16 parameters and an fp32 master copy in the optimizer). A 4-bit base
  (qlora) holds 0.5 byte per quantized weight plus its block constants (blocksize 64: one
  fp32 absmax per block, 0.0625 byte/weight; with double quantization an 8-bit absmax per
  block and an fp32 constant per 256 blocks, ~0.0157 byte/weight), the rest in master dtype.
- gathered: the unsharded working set. FSDP2 keeps the root's parameters (embeddings, LM head)
  gathered through forward and backward and gathers one block ahead of the one running (two
  blocks in compute dtype); ZeRO-3 gathers module by module (twice the largest module, as
  DeepSpeed's own estimate counts). One worker without sharding under bf16 autocast keeps a
  bf16 copy of every weight for backward.
- gradients: one per trainable parameter, in master dtype (FSDP2 reduces in fp32) or bf16
  (DeepSpeed bf16).
- optimizer: AdamW's two moments per trainable parameter in master dtype (+ an fp32 master
  copy with DeepSpeed bf16): full fine-tuning with mixed precision is the ~16 bytes/param rule
  (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1). `backend.offload_optimizer=cpu` moves
  gradients and optimizer to host memory; `offload_param=cpu` moves the parameters too.
- reduce bucket (ZeRO-3): DeepSpeed's contiguous gradient buffer of `reduce_bucket_size`
  elements (default 5e8) in gradient dtype, whole on every rank whatever the model's size.

Activations per micro-batch follow the accounting of Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", sec. 4.1: every tensor a layer keeps
for backward), which gives s*b*h*(34 + 5*a*s/h) bytes per layer at 16-bit for a GPT block.
Here it is written for the pre-norm, gated-MLP, grouped-query decoders `transformers` builds,
without dropout, in elements per token per layer (q = heads x head_dim, kv = kv_heads x head_dim):

    norms:     2h                 (each RMSNorm's input; + 2h for their normalized output
                                   when the norm weights train)
    attention: 2h + 2q + 2kv      (the two norm outputs the projections read; Q and K after
                                   rotary, V, the attention output that o_proj reads)
    MLP:       4f                 (gate, act(gate), up, their product that down_proj reads)
    eager attention adds 2*a*s    (scores and softmax; sdpa / flash keep neither)
    LoRA dropout: each adapted linear reads its own dropped-out copy of its input plus the
                  dropout mask (6h + f for all-linear, twice; the mask is 1 byte on CUDA),
                  and the undropped norm outputs and MLP product are then not kept (2h + f)

times the compute dtype's size (f: the MLP width a token passes, experts per token x expert
width for MoE). After the last layer the final norm keeps its input, and when the base
trains its normalized output and the LM head's input (h or 3h per token). With activation
checkpointing each layer keeps only its input (h per token) and backward recomputes one layer
at a time (one layer's full set on top). Logits: the log-probs are computed over chunks of at
most `train.logits_chunk_mb` of fp32 logits; a chunk, its log-softmax and its gradient are
alive at once (3 x min(b*s*V*4, budget)).

The experts method (orchestrator/methods/experts) holds the selected experts' slices as fp32
parameters beside the frozen fused tensors, and each MoE layer's merged expert tensors live
from its forward to its backward (all layers', or one layer's under checkpointing).

Frozen reference (DPO / KTO with a reference, GRPO with `kl_coef > 0`) when the method's
reference is a frozen copy: its parameters, sharded like the policy's, no optimizer state;
adapters switched off cost nothing. Rollout (GRPO): vLLM takes
`rollout.gpu_memory_utilization` of a GPU for weights + KV cache (colocated: of the train
GPU); the hf engine holds compute-dtype weights and the KV cache of a generate batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.plan.devices import Device
from orchestrator.plan.shapes import Shapes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Component:
    role: str
    name: str
    bytes: int
    where: str = "device"
    """device | host (offloaded)."""
    note: str = ""


@dataclass
class Layout:
    """The run settings the memory model reads (what suggestions vary)."""

    num_workers: int
    micro_batch: int
    checkpointing: bool


RL_STAGES = ("grpo", "ppo")
"""Stages that generate with the rollout engine and train on prompt + completion rows."""


def master_bytes(cfg) -> int:
    return 4 if cfg.model.dtype == "auto" else DTYPE_BYTES[str(cfg.model.dtype)]


def compute_bytes(cfg, dev: Device) -> int:
    mp = str(cfg.backend.mixed_precision)
    if mp == "bf16" or (mp == "auto" and dev.gpu):
        return 2
    return master_bytes(cfg)


def sequence(cfg) -> tuple[int, int]:
    """(rows per micro-batch multiplier, tokens per row) of the stage."""
    stage, d = cfg.stage.name, cfg.data
    if stage == "dpo":
        return 2, d.max_seq_len  # chosen and rejected of each pair
    if stage in RL_STAGES:
        return 1, (d.max_prompt_len or d.max_seq_len) + cfg.rollout.max_new_tokens
    return 1, d.max_seq_len


# Input width of each linear of a decoder block, per token, in units of (hidden, MLP width).
_LINEAR_INPUTS = {"q_proj": (1, 0), "k_proj": (1, 0), "v_proj": (1, 0), "o_proj": (1, 0)}
_LINEAR_INPUTS |= {"gate_proj": (1, 0), "up_proj": (1, 0), "down_proj": (0, 1)}


def lora_dropout_elements(method_cfg, sh: Shapes) -> int:
    """Per token per layer: the dropped-out copy of the input LoRA keeps for each adapted linear."""
    if method_cfg.name not in ("lora", "qlora") or not method_cfg.dropout:
        return 0
    targets = list(method_cfg.target_modules)
    names = _LINEAR_INPUTS if targets == ["all-linear"] else [t for t in targets if t in _LINEAR_INPUTS]
    return sum(_LINEAR_INPUTS[n][0] * sh.hidden + _LINEAR_INPUTS[n][1] * sh.mlp_width for n in names)


def activation_bytes(
    sh: Shapes,
    tokens: int,
    seq: int,
    elem: int,
    checkpointing: bool,
    eager: bool,
    dropout: int = 0,
    mask_bytes: int | None = None,
    recomputed: bool = True,
) -> int:
    """Activations kept for backward by all layers for `tokens` tokens of `seq`-token rows
    (`dropout`: elements per token per layer of LoRA's dropped-out inputs, each with a mask of
    `mask_bytes` per element, `elem` unless given; `recomputed=False`: with checkpointing, only
    what forward keeps, without the layer backward recomputes)."""
    h, q, kv, f = sh.hidden, sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim, sh.mlp_width
    per_layer = 2 * h + 2 * q + 2 * kv + 3 * f  # norm inputs, Q, K, V, attention output, gate, act(gate), up
    per_layer += 2 * h if sh.base_trained else 0  # the norms' normalized output (their weight's gradient)
    # The linears' inputs: dropped-out copies, or the two norm outputs and the MLP product.
    per_layer += dropout if dropout else 2 * h + f
    if eager:
        per_layer += 2 * sh.heads * seq
    layer_bytes = per_layer * elem + dropout * (elem if mask_bytes is None else mask_bytes)
    tail = h * (3 if sh.base_trained else 1) * elem  # final norm input (+ its normalized output, LM head input)
    if checkpointing:
        return tokens * (sh.layers * h * elem + (layer_bytes if recomputed else 0) + tail)
    return tokens * (sh.layers * layer_bytes + tail)


def merged_experts_bytes(cfg, sh: Shapes, checkpointing: bool) -> int:
    """The experts method's merged fused expert tensors (frozen base with the trainable slices
    copied in), each alive from its layer's forward to its backward: every layer's, or with
    checkpointing the one layer backward recomputes."""
    if cfg.method.name != "experts" or not sh.expert_params:
        return 0
    per_layer = sh.expert_params // sh.layers
    return per_layer * master_bytes(cfg) * (1 if checkpointing else sh.layers)


def logits_bytes(sh: Shapes, tokens: int, chunk_mb: int) -> int:
    return 3 * min(tokens * sh.vocab * 4, chunk_mb * 2**20)


def _qlora_params(cfg, sh: Shapes) -> int:
    consts = 0.0157 if cfg.method.double_quant else 0.0625
    frozen_rest = sh.params - sh.linear_params
    return int(sh.linear_params * (0.5 + consts) + frozen_rest * master_bytes(cfg))


def _get(node, key: str, default):
    try:
        return getattr(node, key)
    except (AttributeError, KeyError):  # omegaconf raises either for an absent key
        return default


def model_state(cfg, sh: Shapes, dev: Device, lay: Layout, role: str) -> list[Component]:
    """Parameters, gathered working set, gradients and optimizer state of a trained role."""
    n, ds = lay.num_workers, cfg.backend.name == "deepspeed_zero3"
    cb, mb = compute_bytes(cfg, dev), master_bytes(cfg)
    bf16_ds = ds and cb == 2
    qlora = cfg.method.name == "qlora"
    if qlora:
        params = _qlora_params(cfg, sh)
    else:
        params = sh.params * (2 if bf16_ds else mb)
    sharded = n > 1 or ds or getattr(cfg.backend, "shard_single_rank", False)
    if ds:
        gathered = 2 * sh.largest_module * cb
    elif sharded:
        gathered = (sh.root_params + 2 * sh.block_params) * cb
    elif cb < mb and not qlora:
        gathered = sh.params * cb  # autocast's bf16 weight copies
    else:
        gathered = 0
    if cfg.method.name == "experts":
        # The selected experts' slices are trainable fp32 parameters beside the frozen fused tensors.
        params += sh.trainable * 4
    grads = sh.trainable * (2 if bf16_ds else mb)
    optim = sh.trainable * (2 * mb + (4 if bf16_ds else 0))
    off_opt = ds and str(cfg.backend.offload_optimizer) == "cpu"
    off_par = ds and str(cfg.backend.offload_param) == "cpu"
    bucket = []
    if ds and sh.trainable:
        # ZeRO-3's contiguous gradient bucket: reduce_bucket_size elements of gradient dtype,
        # allocated whole whatever the model's size (DeepSpeed's default 5e8: 2 GB in fp32).
        zero = dict(_get(cfg.backend, "extra", {}) or {}).get("zero_optimization", {}) or {}
        if zero.get("contiguous_gradients", True):
            elems = int(float(zero.get("reduce_bucket_size", 5e8)))
            bucket = [Component(role, "reduce bucket", elems * (2 if bf16_ds else mb), "device", "DeepSpeed")]
    return [
        Component(role, "parameters", -(-params // n), "host" if off_par else "device", f"sharded {n} way(s)"),
        Component(role, "gathered parameters", gathered, "device", "unsharded working set"),
        Component(role, "gradients", -(-grads // n), "host" if off_opt else "device", f"{sh.trainable:,} trainable"),
        Component(role, "optimizer state", -(-optim // n), "host" if off_opt else "device", "AdamW moments"),
        *bucket,
    ]


def training(cfg, sh: Shapes, dev: Device, lay: Layout) -> list[Component]:
    rows, seq = sequence(cfg)
    tokens = rows * lay.micro_batch * seq
    cb = compute_bytes(cfg, dev)
    eager = str(cfg.model.attn_implementation) == "eager"
    drop = lora_dropout_elements(cfg.method, sh)
    # CUDA's fused dropout keeps a bool mask; elsewhere dropout multiplies by a mask of the input's dtype.
    act = activation_bytes(sh, tokens, seq, cb, lay.checkpointing, eager, drop, 1 if dev.gpu else cb)
    note = f"{rows * lay.micro_batch} x {seq} tokens" + (", checkpointed" if lay.checkpointing else "")
    merged = merged_experts_bytes(cfg, sh, lay.checkpointing)
    return [
        *model_state(cfg, sh, dev, lay, "policy"),
        Component("policy", "activations", act, "device", note),
        *([Component("policy", "merged experts", merged, "device", "fused expert tensors")] if merged else []),
        Component("policy", "logits + loss", logits_bytes(sh, tokens, cfg.train.logits_chunk_mb), "device", "fp32"),
    ]


def needs_frozen_reference(cfg) -> bool:
    """Whether the stage builds a frozen copy of the starting model (a `reference` role)."""
    from orchestrator.methods import METHODS
    from orchestrator.methods.base import Reference

    s = cfg.stage
    if s.name == "dpo":
        from orchestrator.algos.preference import PREFERENCE_LOSSES

        uses = not PREFERENCE_LOSSES[str(s.loss)].is_reference_free and not s.precompute_ref
    elif s.name in RL_STAGES:
        uses = s.kl_coef > 0
    else:
        uses = s.name == "kto"
    if not uses:
        return False
    try:
        return METHODS[cfg.method.name](cfg.method).reference is Reference.FROZEN_COPY
    except Exception:  # noqa: BLE001 (a method whose reference needs run context: plan for the copy)
        return True


def reference(cfg, sh: Shapes, dev: Device, lay: Layout) -> list[Component]:
    if not needs_frozen_reference(cfg):
        return []
    params = _qlora_params(cfg, sh) if cfg.method.name == "qlora" else sh.params * master_bytes(cfg)
    return [Component("reference", "parameters", -(-params // lay.num_workers), "device", "frozen copy, sharded")]


def learned_roles(cfg, sh: Shapes, dev: Device, lay: Layout) -> list[Component]:
    """PPO's critic (a trained copy with a value head: its own parameters, gradients and
    AdamW state; its activations come after the policy's, so the policy's bound them) and
    the frozen reward model of a `reward_model` reward, both on the policy's devices."""
    s, out = cfg.stage, []
    if s.name == "ppo" and str(s.estimator) == "gae":
        out += [replace(c, role="critic") for c in model_state(cfg, sh, dev, lay, "critic")]
    if any(r.name == "reward_model" for r in getattr(s, "rewards", [])):
        params = sh.params * master_bytes(cfg)
        out.append(Component("reward_model", "parameters", -(-params // lay.num_workers), "device", "frozen, sharded"))
    return out


def kv_bytes_per_token(sh: Shapes, elem: int) -> int:
    return 2 * sh.layers * sh.kv_heads * sh.head_dim * elem


def rollout(cfg, sh: Shapes, dev: Device) -> list[Component]:
    """The rollout engine of an RL stage, on the train GPU (colocated) or its own (separate)."""
    if cfg.stage.name not in RL_STAGES:
        return []
    r = cfg.rollout
    role = "rollout" if str(r.placement) == "colocated" else "rollout (own device)"
    elem = 2 if dev.gpu and str(r.dtype) == "auto" else DTYPE_BYTES.get(str(r.dtype), master_bytes(cfg))
    weights = sh.params * elem
    seq = sequence(cfg)[1]
    if str(r.engine) == "vllm" and dev.gpu:
        budget = int(r.gpu_memory_utilization * dev.memory)
        tp = r.tensor_parallel_size
        return [
            Component(role, "vllm weights", weights // tp, "device", f"tensor_parallel_size={tp}"),
            Component(
                role,
                "vllm KV cache",
                max(budget - weights // tp, 0),
                "device",
                f"gpu_memory_utilization={r.gpu_memory_utilization}",
            ),
        ]
    if str(r.engine) == "vllm":
        return [
            Component(role, "vllm weights", weights, "device"),
            Component(role, "vllm KV cache", int(r.cpu_kv_cache_gib * 2**30), "device", "rollout.cpu_kv_cache_gib"),
        ]
    kv = r.batch_size * r.n * seq * kv_bytes_per_token(sh, elem)
    return [
        Component(role, "hf weights", weights, "device"),
        Component(role, "hf KV cache", kv, "device", f"{r.batch_size} prompts x {r.n} x {seq} tokens"),
    ]


def kv_tokens(cfg, sh: Shapes, dev: Device, comps: list[Component]) -> int | None:
    """Tokens the vLLM KV cache holds (None: no vLLM rollout)."""
    kv = [c for c in comps if c.name == "vllm KV cache"]
    if not kv:
        return None
    elem = 2 if dev.gpu else master_bytes(cfg)
    return kv[0].bytes * cfg.rollout.tensor_parallel_size // kv_bytes_per_token(sh, elem)
