"""The recipe schema: typed sections with defaults, loaded from YAML, overridden from the CLI.

A recipe is validated completely (unknown keys, wrong types, bad ranges, unknown loss names and
loss parameters) before any model loads, so a typo costs a second, not a model load.
This module knows nothing of torch or models.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from posttrain.errors import RecipeError
from posttrain.rewards.registry import RewardTerm  # one reward of online RL (imports no torch)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    num_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms


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
    init_adapter: Optional[str] = None  # start from an existing peft adapter directory


@dataclass
class ReferenceConfig:
    # adapter_off: the policy with its LoRA adapters disabled (no second copy in memory);
    # separate: another model at `name_or_path`; the default when LoRA is off or starts from an adapter
    # is decided in posttrain.models.
    kind: Literal["auto", "adapter_off", "separate"] = "auto"
    name_or_path: Optional[str] = None
    precompute: bool = False  # compute reference log-probs once before training and reuse them


@dataclass
class DataSource:
    """One data source: a file/directory of the user's, or a built-in generated task."""

    path: Optional[str] = None
    builtin: Optional[str] = None  # name of a built-in task, e.g. "arithmetic"
    split: str = "train"  # for built-in tasks: train | heldout; for datasets dirs: the split name
    # pairs: trl | hh; prompts (online RL): gsm8k | math | rl | prompt_answer (docs/rewards.md); auto detects
    format: Literal["auto", "trl", "hh", "gsm8k", "math", "rl", "prompt_answer"] = "auto"
    start: int = 0  # skip the first N valid rows (e.g. to hold out the rest of a file)
    limit: Optional[int] = None  # then keep at most N valid rows
    num_rows: Optional[int] = None  # for built-in tasks: how many pairs to generate


@dataclass
class DataConfig:
    train: DataSource = field(default_factory=lambda: DataSource(builtin="arithmetic"))
    heldout: Optional[DataSource] = None
    template: Literal["plain", "chat"] = "chat"
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
class RolloutConfig:
    """Online RL: how completions are sampled, scored and fed to a group loss (docs/online_rl.md)."""

    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    engine: str = "hf"  # "hf" (transformers generate) or `module.path:Class` (a GenerationEngine)
    generation_batch_size: int = 64  # sequences per generate call
    prefill_once: bool = True  # hf engine: a group's prompt prefilled once, its KV cache copied to the G completions
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
    bf16: bool = False  # autocast to bfloat16 for the forward passes
    shuffle: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient norm stops the run or skips the step
    # Checked before training against the largest micro-batch the plan builds (sequences x padded length).
    max_tokens_per_micro_batch: Optional[int] = None
    # Row layout of offline pairs (posttrain.data.layout, docs/performance.md); same numbers as the plain path.
    share_prompt: bool = False  # one row per pair: the prompt computed once, both responses attend to it
    packing: bool = False  # several sequences per row, position ids restarting, attention confined to each
    pack_tokens: int = 1024  # about this many positions per packed row (rows of balanced length)


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True


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
        for ok, message in problems:
            if not ok:
                raise RecipeError(message)


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


# --------------------------------------------------------------------------------------------
# Building typed dataclasses from plain dicts, with messages that name the key path.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[-1] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}.{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping (section with keys), got {value!r}")
        return build_dataclass(tp, value, where)
    if origin is list:
        (item_tp,) = args or (Any,)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    raise RecipeError(f"{where}: unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `values`, rejecting unknown keys with a close-match hint."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            valid = f"Valid keys here: {', '.join(names)}." if names else "No keys are valid here."
            raise RecipeError(f"unknown key {path!r}.{extra} {valid}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _check_ranges(recipe: Recipe) -> None:
    t = recipe.train
    checks = [
        (t.lr > 0, f"train.lr must be positive, got {t.lr}. A typical LoRA learning rate is 1e-4 to 5e-4."),
        (t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}."),
        (t.micro_batch_size >= 1, f"train.micro_batch_size must be at least 1, got {t.micro_batch_size}."),
        (t.pack_tokens >= 2, f"train.pack_tokens must be at least 2, got {t.pack_tokens}."),
        (t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}."),
        (t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be at least 1, got {t.max_steps}."),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}."),
        (0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}."),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}."),
        (t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm must be positive or null."),
        (t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= 1,
         f"train.max_tokens_per_micro_batch must be positive or null, got {t.max_tokens_per_micro_batch}."),
        (len(t.adam_betas) == 2, f"train.adam_betas must hold two numbers, got {t.adam_betas}."),
        (recipe.data.max_length >= 2, f"data.max_length must be at least 2, got {recipe.data.max_length}."),
        (recipe.lora.r >= 1, f"lora.r must be at least 1, got {recipe.lora.r}."),
        (0 <= recipe.lora.dropout < 1, f"lora.dropout must be in [0, 1), got {recipe.lora.dropout}."),
        (recipe.logging.every >= 1, f"logging.every must be at least 1, got {recipe.logging.every}."),
        (recipe.eval.every >= 0, f"eval.every must be >= 0, got {recipe.eval.every}."),
        (recipe.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {recipe.checkpoint.every}."),
        (len(recipe.loss) >= 1, "loss must name at least one loss."),
        (recipe.rollout.group_size >= 2, f"rollout.group_size must be at least 2 (a group baseline needs two "
                                         f"completions), got {recipe.rollout.group_size}."),
        (recipe.rollout.max_new_tokens >= 1, f"rollout.max_new_tokens must be at least 1, got "
                                             f"{recipe.rollout.max_new_tokens}."),
        (0 <= recipe.rollout.min_new_tokens <= recipe.rollout.max_new_tokens,
         "rollout.min_new_tokens must be in [0, max_new_tokens]."),
        (recipe.rollout.temperature > 0, f"rollout.temperature must be positive, got {recipe.rollout.temperature}."),
        (0 < recipe.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {recipe.rollout.top_p}."),
        (recipe.rollout.updates_per_batch >= 1, "rollout.updates_per_batch must be at least 1."),
        (recipe.rollout.reward_timeout > 0, "rollout.reward_timeout must be positive."),
        (recipe.rollout.max_resample_rounds >= 0, "rollout.max_resample_rounds must be >= 0."),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)
    for i, src in enumerate([recipe.data.train] + ([recipe.data.heldout] if recipe.data.heldout else [])):
        name = "data.train" if i == 0 else "data.heldout"
        if (src.path is None) == (src.builtin is None):
            raise RecipeError(f"{name}: give exactly one of `path` (your data file) or `builtin` (a generated task).")


def _normalise_loss_section(raw: dict) -> dict:
    """`loss` and `rewards` may be one mapping (or a name) or a list of weighted terms; store them as lists."""
    for section in ("loss", "rewards"):
        value = raw.get(section)
        if isinstance(value, dict):
            raw[section] = [value]
        elif isinstance(value, str):
            raw[section] = [{"name": value}]
    return raw


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise RecipeError(f"--set {dotted}: {'.'.join(parts[:i + 1])} is not an index into a list") from None
            continue
        if part == "loss" and isinstance(node.get("loss"), list) and not parts[i + 1].isdigit():
            node = node["loss"][0]  # `loss.params.beta` addresses the single (first) loss term
            continue
        node = node.setdefault(part, {})
        if node is None:
            node = {}
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"--set expects key=value (for example train.lr=1e-4), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_recipe(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                raw: Optional[dict] = None) -> Recipe:
    """Read a YAML recipe (or a dict), apply `key=value` overrides, validate, and return it.

    Loss names and parameters are checked against the loss registry (custom `module:Class` losses
    are imported, relative to the recipe's directory and the working directory).
    """
    if raw is None:
        raw = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise RecipeError(f"recipe file {str(p)!r} does not exist.")
            try:
                raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise RecipeError(f"recipe {str(p)!r} is not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise RecipeError(f"recipe {str(p)!r} must be a mapping of sections (run, model, data, loss, train, ...).")
    raw = _normalise_loss_section(dict(raw))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        raw = _normalise_loss_section(raw)
    recipe = build_dataclass(Recipe, raw)
    _check_ranges(recipe)
    from posttrain.losses import validate_loss_terms  # registry lookup; no torch model involved

    search_dirs = [Path(path).resolve().parent] if path else []
    validate_loss_terms(recipe.loss, search_dirs=search_dirs)
    if recipe.rewards:
        from posttrain.rewards import validate_reward_terms  # imports no torch

        validate_reward_terms(recipe.rewards, search_dirs=search_dirs)
    from posttrain.samplers import SAMPLERS

    if recipe.sampler.name not in SAMPLERS:
        close = difflib.get_close_matches(recipe.sampler.name, list(SAMPLERS), n=1)
        raise RecipeError(f"sampler.name {recipe.sampler.name!r} is not a sampler"
                          f"{f'; did you mean {close[0]!r}' if close else ''}? Samplers: {', '.join(sorted(SAMPLERS))}.")
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
