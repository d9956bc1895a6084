"""Generation engines: the one interface the online trainer samples completions through.

Contract (what an engine must do; docs/online_rl.md, "Adding a generation engine"):

    engine.generate(prompts: list[list[int]], params: SamplingParams) -> list[Completion]

- `prompts` are token ids of rendered prompts (chat template applied), one entry per *completion*
  wanted: a group of G completions of one prompt is G copies of its ids, so the engine needs no
  notion of groups.
- Each `Completion.token_ids` holds the sampled tokens after the prompt, cut just after the first
  stop token (which is kept: it counts in the loss as the end of the turn), or `max_new_tokens`
  tokens when no stop token came (`truncated = True`). No padding.
- Sampling follows `params` (temperature, top-p, top-k, length limits) from the *current* policy,
  adapters on. Old-policy log-probs come from the trainer's own forward pass (logits / temperature), so
  an engine with other numerics (vLLM's kernels) still gives exact PPO ratios; the engine's own log-probs
  of the sampled tokens (`Completion.logprobs`, optional) only measure and correct the engine/trainer
  mismatch (posttrain.core.mismatch).
- `sync_weights(model)` is called before each rollout: an engine that keeps its own copy of the
  weights (vLLM, posttrain.rollout.vllm_engine) loads the trainer's current weights there; the HF engine
  generates with the training model itself and needs nothing.
- `concurrent`: whether `generate_held` may run on a background thread while the trainer updates the policy
  (one-step off-policy rollouts, `rollout.max_staleness: 1`); true for an engine with its own weights. Such
  an engine stamps each completion with the policy version it sampled (`Completion.policy_version`).
- An engine is built as `Engine.from_context(context)` with an `EngineContext` (the policy, tokenizer,
  stop tokens, the recipe's rollout section, the ZeRO-3 gather and precision contexts, the current
  step); the default `from_context` calls `Engine(context)`. Recipes name engines by their registered
  name (`hf`) or as `module.path:Class`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from posttrain.registry import Registry
from posttrain.rollout.decode import left_padded, static_cache_decode
from posttrain.rollout.merged import merged_adapter_weights


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False


@dataclass
class Completion:
    token_ids: list[int]
    truncated: bool  # no stop token within max_new_tokens
    logprobs: Optional[list[float]] = None  # the engine's log-prob of each sampled token; None: the trainer's own
    policy_version: Optional[int] = None  # the engine's policy version that sampled it; None: the trainer's current


@dataclass
class EngineContext:
    """What an engine may use of the run: `policy()` the (peft) causal LM being trained, its tokenizer, the
    pad and stop token ids, the recipe's `rollout` section, `gather()` (ZeRO-3: the parameters whole) and
    `autocast()` (the run's precision) contexts, and `current_step()` (optimiser steps taken). For engines that
    hold their own copy of the model: the recipe's model name, its local directory and dtype, whether the policy is a LoRA
    adapter (`lora_rank`, None: full weights), the run's seed, a directory of this process's own (`work_dir`),
    the longest sequence a rollout can make, and the process's rank."""

    policy: Callable[[], Any]
    tokenizer: Any
    pad_id: int
    stop_ids: list[int]
    rollout: Any
    gather: Callable = contextlib.nullcontext
    autocast: Callable = contextlib.nullcontext
    current_step: Callable[[], int] = lambda: 0
    model_name: str = ""
    model_path: str = ""
    dtype: str = "float32"
    lora_rank: Optional[int] = None
    seed: int = 0
    work_dir: Optional[Path] = None
    max_model_len: int = 1024
    rank: int = 0


class GenerationEngine:
    """Base class of generation engines (see the module docstring for the contract)."""

    name = ""
    concurrent = False

    @classmethod
    def from_context(cls, context: EngineContext) -> "GenerationEngine":
        return cls(context)

    def sync_weights(self, model) -> None:
        """Load the trainer's current weights into the engine (no-op when it samples the training model)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        raise NotImplementedError  # abstractmethod: every engine defines it

    def generate_held(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """`generate` from the weights the engine holds now, without a sync: what a background rollout calls."""
        return self.generate(prompts, params)

    def metrics(self) -> dict[str, float]:
        """Numbers of the last rollout to log with the step (an engine with its own weights: its sync and probe)."""
        return {}

    def close(self) -> None:
        """Release what the engine holds (its processes, servers' sessions) at the end of the run."""


def cut_at_stop(tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> Completion:
    """The completion up to and including the first stop token; truncated if none came in time."""
    for k, token in enumerate(tokens[:max_new_tokens]):
        if token in stop_ids:
            return Completion(tokens[:k + 1], truncated=False)
    return Completion(tokens[:max_new_tokens], truncated=True)


ENGINES = Registry("rollout engine", GenerationEngine, "or give your own as 'module.path:EngineClass'")


@ENGINES.register("hf")
class HFGenerateEngine(GenerationEngine):
    """`transformers` generate with the KV cache, on the training model itself (adapters on).

    `model_getter()` returns the (peft) causal LM; `gather()` returns a context manager in which its
    parameters are whole on every process (ZeRO-3: `deepspeed.zero.GatheredParameters`, so ranks whose
    completions end at different lengths never wait on each other), else a null context; `autocast()`
    the precision context (the trainer's bf16 autocast when the recipe asks for it).
    Prompts are left-padded and generated `batch_size` at a time.

    `static_cache` (default): posttrain's decode loop (`posttrain.rollout.decode`: a static KV cache written in
    place, logits of the last position only, sampling on those); greedy tokens equal generate's, sampled ones
    come from the same distribution. Off, and under ZeRO-3: transformers' `generate`.

    `merge_adapters` (the decode loop only): sample from LoRA merged into a copy of the base weights
    (`posttrain.rollout.merged`); "auto" (default) where that is exact to rounding (fp32 weights, no autocast).

    `prefill_once`: a prompt that occurs several times in a batch (a group's G copies) is run through the
    model once; its KV cache is copied to every copy and `generate` continues from there (the cache holds
    all prompt tokens but the last, which generate feeds to produce the first new token). Position ids
    follow generate's own rule (cumulative attention mask), so each copy samples from the distribution a
    full prefill would give, up to float rounding of the smaller batch.
    """

    def __init__(self, model_getter: Callable, pad_id: int, stop_ids: list[int], batch_size: int = 64,
                 gather: Optional[Callable] = None, autocast: Optional[Callable] = None, prefill_once: bool = True,
                 static_cache: bool = True, merge_adapters: bool | str = "auto"):
        self.model_getter = model_getter
        self.pad_id = pad_id
        self.stop_ids = set(int(i) for i in stop_ids)
        self.batch_size = batch_size
        self.gather = gather or contextlib.nullcontext
        self.autocast = autocast or contextlib.nullcontext
        self.prefill_once = prefill_once
        self.static_cache = static_cache
        self.merge_adapters = merge_adapters

    @classmethod
    def from_context(cls, context: EngineContext) -> "HFGenerateEngine":
        ro = context.rollout
        return cls(context.policy, context.pad_id, context.stop_ids, ro.generation_batch_size, gather=context.gather,
                   autocast=context.autocast, prefill_once=ro.prefill_once, static_cache=ro.static_cache,
                   merge_adapters=ro.merge_adapters)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model_getter()
        was_training = model.training
        model.eval()  # dropout off while sampling
        use_cache = model.config.use_cache
        model.config.use_cache = True
        device = next(model.parameters()).device
        decode_loop = self.static_cache and not _zero3_partitioned(model)
        out: list[Completion] = []
        try:
            with self.gather(), self.autocast(), self._sampling_weights(model, decode_loop):
                for start in range(0, len(prompts), self.batch_size):
                    chunk = prompts[start:start + self.batch_size]
                    out += self._generate_chunk(model, chunk, params, device, decode_loop)
        finally:
            model.config.use_cache = use_cache
            model.train(was_training)
        return out

    def _sampling_weights(self, model, decode_loop: bool):
        """Merged adapters for the decode loop (`merge_adapters`: true, or auto where merging is exact)."""
        if decode_loop and self.merge_adapters in (True, "auto"):
            return merged_adapter_weights(model, exact_only=self.merge_adapters == "auto")
        return contextlib.nullcontext()

    def _shared_prefix_cache(self, model, prompts: list[list[int]], width: int, device, keyword: str):
        """The KV cache of every prompt but its last token, computed once per distinct prompt and copied to each
        occurrence; None when no prompt repeats."""
        from transformers import DynamicCache

        distinct: dict[tuple, int] = {}
        owner = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) == len(prompts) or width < 2:
            return None
        input_ids, attention_mask = left_padded(list(distinct), width, self.pad_id)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # generate's rule
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids[:, :-1].to(device), attention_mask=attention_mask[:, :-1].to(device),
              position_ids=position_ids[:, :-1].to(device), use_cache=True, logits_to_keep=1,
              **{keyword: cache})
        cache.reorder_cache(torch.tensor(owner, device=device))
        return cache

    def _generate_chunk(self, model, prompts: list[list[int]], params: SamplingParams, device,
                        decode_loop: bool) -> list[Completion]:
        if decode_loop:
            new = static_cache_decode(model, prompts, params, self.pad_id, self.stop_ids, _cache_keyword(model),
                                      self.prefill_once, device)
            return [cut_at_stop(tokens, self.stop_ids, params.max_new_tokens) for tokens in new]
        width = max(len(p) for p in prompts)
        input_ids, attention_mask = left_padded(prompts, width, self.pad_id)
        kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                      eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id, use_cache=True)
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if self.prefill_once:
            keyword = _cache_keyword(model)
            cache = self._shared_prefix_cache(model, prompts, width, device, keyword)
            if cache is not None:
                kwargs[keyword] = cache
        sequences = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
        new = sequences[:, width:].tolist()
        return [cut_at_stop(tokens, self.stop_ids, params.max_new_tokens) for tokens in new]


def _zero3_partitioned(model) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the model's parameters. There the engine decodes with `generate`: the
    decode loop's forwards inside the parameter gather left a parameter in flight at the gather's end (DeepSpeed's
    prefetch; tests/test_online_distributed.py), a cause not yet pinned down."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _cache_keyword(model) -> str:
    """`cache` in recent transformers, `past_key_values` before it was renamed."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
