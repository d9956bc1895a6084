"""The recipe schema: typed sections with their defaults. A leaf: it imports nothing of posttrain's, so
every part may read a recipe. Loading, overrides and validation live in posttrain.recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from posttrain.errors import RecipeError


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    num_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms
    callbacks: list[str] = field(default_factory=list)  # "module.path:Class" (posttrain.callbacks)


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    use_dora: bool = False  # DoRA: a trained magnitude per output feature (peft's use_dora)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) instead of alpha / r
    modules_to_save: Optional[list[str]] = None  # modules trained in full beside the adapter, e.g. [lm_head]
    init_adapter: Optional[str] = None  # start from an existing peft adapter directory
    # base_model_name_or_path written into final/: null = portable (the hub id for the built-in alias)
    adapter_base: Optional[str] = None


@dataclass
class ReferenceConfig:
    # adapter_off: the policy with its LoRA adapters disabled (no second copy in memory);
    # separate: another model at `name_or_path`; the default when LoRA is off or starts from an adapter
    # is decided in posttrain.models.
    kind: Literal["auto", "adapter_off", "separate"] = "auto"
    name_or_path: Optional[str] = None
    # compute reference log-probs of every training pair once before training and reuse them; auto: where that
    # costs fewer reference passes than computing them live (posttrain.trainer.Trainer._resolve_precompute)
    precompute: Union[bool, Literal["auto"]] = "auto"


@dataclass
class DataSource:
    """One data source: a file/directory of the user's, or a built-in generated task."""

    path: Optional[str] = None  # a local file or directory, or a Hub dataset id (owner/name; the local cache offline)
    config: Optional[str] = None  # a Hub dataset's configuration (openai/gsm8k: main)
    builtin: Optional[str] = None  # name of a built-in task, e.g. "arithmetic"
    split: str = "train"  # for built-in tasks: train | heldout; for datasets dirs: the split name
    # pairs: trl | hh | sft (demonstrations, for sft) | kto (unpaired, for kto); prompts (online RL): gsm8k | math | rl | prompt_answer (docs/rewards.md); auto detects
    format: Literal["auto", "trl", "hh", "sft", "kto", "gsm8k", "math", "rl", "prompt_answer"] = "auto"
    start: int = 0  # skip the first N valid rows (e.g. to hold out the rest of a file)
    limit: Optional[int] = None  # then keep at most N valid rows
    num_rows: Optional[int] = None  # for built-in tasks: how many pairs to generate


@dataclass
class DataConfig:
    train: DataSource = field(default_factory=lambda: DataSource(builtin="arithmetic"))
    heldout: Optional[DataSource] = None
    template: Literal["auto", "chat", "plain"] = "auto"  # auto: chat messages via the chat template, text as is
    max_length: int = 512
    max_prompt_length: Optional[int] = None
    truncation: Literal["keep_start", "error"] = "keep_start"
    invalid_rows: Literal["error", "skip"] = "error"


@dataclass
class LossTerm:
    name: str = "dpo"
    weight: float = 1.0
    params: dict = field(default_factory=dict)


@dataclass
class RewardTerm:
    """One weighted reward of online RL. `label` names it in logs and components (default: `name`); two terms
    with the same name need different labels."""

    name: str
    weight: float = 1.0
    params: dict = field(default_factory=dict)
    label: Optional[str] = None

    @property
    def display_name(self) -> str:
        return self.label or self.name


@dataclass
class VLLMConfig:
    """`rollout.engine: vllm` (colocated) and `vllm_server` (docs/online_rl.md, "Engines")."""

    gpu_memory_utilization: float = 0.3  # CUDA: the share of GPU memory vLLM may take (weights + KV cache)
    enable_sleep_mode: bool = False  # CUDA: free vLLM's KV cache (and offload its weights) while the trainer trains
    tensor_parallel_size: int = 1
    kv_cache_gib: int = 2  # CPU: the KV cache's size (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: Optional[int] = None  # default: data.max_length + rollout.max_new_tokens
    enforce_eager: bool = True  # no CUDA graphs / compilation (vLLM starts in seconds instead of minutes)
    probe_tolerance: Optional[float] = None  # max |log-prob gap| after a sync; default 1e-3 in float32, 0.25 in bf16
    timeout_s: float = 600.0  # one rollout's wall-clock limit; past it the run stops (a hung engine)
    server_url: str = "http://127.0.0.1:8000"  # vllm_server: where `posttrain rollout-server` listens
    api_key: Optional[str] = None  # vllm_server: the server's --api-key
    request_retries: int = 3  # vllm_server: attempts per request before the run stops


@dataclass
class MismatchConfig:
    """Engine/trainer mismatch correction (docs/online_rl.md, "Engine/trainer mismatch"): the sampled tokens'
    ratio pi_old / pi_engine, with pi_engine the engine's own log-probs. `tis`: truncated importance sampling, each
    token's (or sequence's) policy-gradient coefficient times min(ratio, cap); `mask`: coefficients of tokens (or
    sequences) whose ratio leaves [1/cap, cap] set to 0; `none`: only logged."""

    correction: Literal["none", "tis", "mask"] = "none"
    level: Literal["token", "sequence"] = "token"
    cap: float = 2.0


@dataclass
class RolloutConfig:
    """Online RL: how completions are sampled, scored and fed to a group loss (docs/online_rl.md)."""

    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    engine: str = "hf"  # hf (the training model) | vllm (colocated) | vllm_server | `module.path:Class`
    generation_batch_size: int = 64  # sequences per generate call
    prefill_once: bool = True  # hf engine: a group's prompt prefilled once, its KV cache copied to the G completions
    static_cache: bool = True  # hf engine: posttrain's decode loop on a static KV cache; false: transformers' generate
    # hf engine's decode loop: sample from LoRA merged into a copy of the base weights; auto: where that is exact to
    # float rounding (fp32 or float64 weights, no autocast), not with bf16 weights or autocast (rounds the merged weight)
    merge_adapters: Union[bool, Literal["auto"]] = "auto"
    truncated: Literal["keep", "mask", "penalize"] = "keep"  # completions without EOS within max_new_tokens
    truncated_reward: float = 0.0  # their reward under `penalize`
    updates_per_batch: int = 1  # optimiser updates per rollout batch (TRL's num_iterations)
    recompute_old_logprobs: bool = False  # pi_old from a no-grad pass even with one update per batch
    reward_workers: int = 2  # processes scoring rewards; 0 = in the main process
    reward_timeout: float = 10.0  # seconds per reward call
    filter_zero_variance: bool = False  # drop groups whose reward std <= zero_variance_eps (DAPO dynamic sampling)
    zero_variance_eps: float = 1e-6
    max_resample_rounds: int = 2  # with the filter: rounds of extra prompts to refill the batch
    eval_max_new_tokens: Optional[int] = None  # greedy held-out evaluation; default max_new_tokens
    advantage_estimator: Optional[str] = None  # group_mean | group_mean_std | batch_std | leave_one_out | none
    # 0: each step samples from the current policy; 1: step k trains on what version k-1 sampled, rolled out while
    # step k-1 trained (engines with their own weights; the hf engine has no overlap), ratio against that version
    max_staleness: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)


@dataclass
class SamplerConfig:
    """Which prompts each online step rolls out: `uniform` or `vade` (posttrain.samplers)."""

    name: str = "uniform"
    params: dict = field(default_factory=dict)
    success_component: Optional[str] = None  # reward component that says "correct"; default: the first reward
    success_threshold: float = 0.5


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    momentum: float = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 8  # pairs (or prompts) per optimiser step, over all processes
    micro_batch_size: int = 4  # per process per forward/backward
    max_grad_norm: Optional[float] = 1.0
    bf16: bool = False  # autocast to bfloat16 for the forward passes (always on with model.dtype: bfloat16)
    shuffle: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient norm stops the run or skips the step
    # Checked before training against the largest micro-batch the plan builds (sequences x padded length).
    max_tokens_per_micro_batch: Optional[int] = None
    # Row layout of offline pairs (posttrain.data.layout, docs/performance.md); same numbers as the plain path.
    # auto: the shared prompt where the attention kernel honours a custom 4-D mask; packing for offline pairs
    # where the cost model says it pays (posttrain.data.layout.packing_pays); the log says what it chose
    share_prompt: Union[bool, Literal["auto"]] = "auto"  # one row per pair: the prompt computed once for its responses
    packing: Union[bool, Literal["auto"]] = "auto"  # several sequences per row, position ids restarting
    pack_tokens: int = 1024  # about this many positions per packed row (rows of balanced length)


@dataclass
class LogConfig:
    every: int = 1
    # where metrics go besides <output_dir>/metrics.jsonl (always written): tensorboard (<output_dir>/tensorboard),
    # wandb, trackio, mlflow (accelerate's trackers; docs/trackers.md); [] or [jsonl]: the JSONL file alone
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    project: str = "posttrain"  # the wandb / trackio project and the mlflow experiment
    run_name: Optional[str] = None  # default: the output directory's name
    tracker_kwargs: dict = field(default_factory=dict)  # per tracker, its init arguments: {wandb: {mode: offline}}
    progress_bar: bool = True
    completions: bool = False  # online runs: every rollout to <output_dir>/completions.jsonl (TRL's log_completions)


@dataclass
class EvalConfig:
    every: int = 0  # steps between held-out evaluations during training; 0 = only before and after
    max_pairs: Optional[int] = None
    batch_size: int = 16
    at_start: bool = True
    at_end: bool = True
    # --- ranking-accuracy evaluation (docs/evaluation.md; spec sections 11 and 12) ---
    betas: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 5.0, 10.0])  # for R*, R~*
    alpha: float = 1.0  # preference probability of held-out pairs without votes / an `alpha` field
    alpha_eps: float = 0.001  # loser fraction used where alpha = 1
    tie_threshold: float = 0.01  # tie test of pairs with alpha = 0.5
    bootstrap: int = 1000  # resamples for the 95% intervals
    layout: Literal["auto", "shared", "separate"] = "auto"  # scoring rows: prompt shared per pair, or per sequence
    report: bool = True  # write <output_dir>/eval/: report.json, pairs.jsonl, summary.md, plots
    entanglement_every: Optional[int] = None  # gradient-entanglement diagnostic; null: as eval.every; 0: off
    entanglement_pairs: int = 8  # size k of its fixed diagnostic batch

    def __post_init__(self):
        problems = [
            (bool(self.betas) and all(b > 0 for b in self.betas), f"eval.betas must be positive, got {self.betas}."),
            (0 < self.alpha <= 1, f"eval.alpha must be in (0, 1], got {self.alpha}."),
            (0 < self.alpha_eps < 0.5, f"eval.alpha_eps must be in (0, 0.5), got {self.alpha_eps}."),
            (self.tie_threshold >= 0, f"eval.tie_threshold must be >= 0, got {self.tie_threshold}."),
            (self.bootstrap >= 0, f"eval.bootstrap must be >= 0, got {self.bootstrap}."),
            (self.entanglement_every is None or self.entanglement_every >= 0,
             f"eval.entanglement_every must be >= 0 or null, got {self.entanglement_every}."),
            (self.entanglement_pairs >= 1,
             f"eval.entanglement_pairs must be at least 1, got {self.entanglement_pairs}."),
        ]
        wrong = [message for ok, message in problems if not ok]
        if wrong:
            raise RecipeError(*wrong)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: list[LossTerm] = field(default_factory=lambda: [LossTerm()])
    rewards: list[RewardTerm] = field(default_factory=list)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def autocast_bf16(self) -> bool:
        """Forward passes under bf16 autocast: `train.bf16`, or base weights stored in bf16 (`model.dtype:
        bfloat16`), whose fp32 adapters and fp32 residual stream need it (docs/performance.md, bf16 base weights)."""
        return self.train.bf16 or self.model.dtype == "bfloat16"


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


# TRL's names for what the recipe calls otherwise: the sentence shown when one is used as a key.
TRL_NAMES = {
    "learning_rate": "TRL's learning_rate is `train.lr` here.",
    "gradient_accumulation_steps": "posttrain derives the accumulation steps: `train.batch_size` is the pairs (or "
                                   "prompts) per optimiser step over all processes and `train.micro_batch_size` those "
                                   "per forward/backward on one process; accumulation = batch_size / processes / "
                                   "micro_batch_size.",
    "per_device_train_batch_size": "TRL's per_device_train_batch_size is `train.micro_batch_size` here, and "
                                   "`train.batch_size` the pairs per optimiser step over all processes.",
    "num_train_epochs": "TRL's num_train_epochs is `train.epochs` here.",
    "beta": "beta is a loss parameter: `loss: {name: dpo, params: {beta: 0.1}}` (or --set loss.params.beta=0.1).",
    "lr_scheduler_type": "TRL's lr_scheduler_type is `train.lr_scheduler` here.",
    "logging_steps": "TRL's logging_steps is `logging.every` here.",
    "report_to": "TRL's report_to is `logging.report_to` here (a list: jsonl, tensorboard, wandb, trackio, mlflow).",
    "run_name": "TRL's run_name is `logging.run_name` here.",
    "log_completions": "TRL's log_completions is `logging.completions: true` here (online runs; <output_dir>/completions.jsonl).",
    "save_steps": "TRL's save_steps is `checkpoint.every` here.",
    "eval_steps": "TRL's eval_steps is `eval.every` here.",
    "output_dir": "TRL's output_dir is `run.output_dir` here.",
    "seed": "TRL's seed is `run.seed` here.",
    "loss_type": "the loss is named by `loss: {name: ...}` (`posttrain losses` lists them).",
    "num_generations": "TRL's num_generations is `rollout.group_size` here.",
    "max_completion_length": "TRL's max_completion_length is `rollout.max_new_tokens` here.",
    "gradient_checkpointing": "it is `model.gradient_checkpointing` here.",
    "max_prompt_length": "it is `data.max_prompt_length` here.",
    "bf16": "it is `train.bf16` here.",
}
