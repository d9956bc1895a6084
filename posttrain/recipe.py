"""Loading a recipe: YAML (or a dict), `--set key=value` overrides, and complete validation before any
model loads: unknown keys, wrong types, bad ranges, every plug-in's name and params (losses, rewards,
sampler, generation engine) and the attention kernel against the row layout. A typo costs a second,
not a model load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from posttrain.config import TRL_NAMES, Recipe
from posttrain.errors import RecipeError
from posttrain.logs import TRACKERS
from posttrain.losses import ADVANTAGE_ESTIMATORS, build_loss
from posttrain.models import check_attention
from posttrain.rewards import validate_reward_terms
from posttrain.rollout import ENGINES
from posttrain.samplers import SAMPLERS
from posttrain.typed import build_dataclass


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML would keep the last one silently)."""


def _mapping_without_repeats(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if repeated:
            raise yaml.constructor.ConstructorError("while reading a section", node.start_mark,
                                                    f"found key {key!r} a second time", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def tracker_problems(logging) -> list[str]:
    """Unknown tracker names, trackers whose package is not installed, and kwargs for trackers not reported to."""
    import importlib.util

    problems = []
    for name in logging.report_to:
        if name not in TRACKERS:
            problems.append(f"logging.report_to: unknown tracker {name!r}; posttrain reports to "
                            f"{', '.join(TRACKERS)}.")
        elif TRACKERS[name] and importlib.util.find_spec(TRACKERS[name][0]) is None:
            problems.append(f"logging.report_to: {name!r} needs the {TRACKERS[name][1]!r} package, which is not "
                            f"installed: pip install {TRACKERS[name][1]}")
    for name in logging.tracker_kwargs:
        if name not in logging.report_to:
            problems.append(f"logging.tracker_kwargs.{name}: {name!r} is not in logging.report_to "
                            f"({logging.report_to}).")
    return problems


def _range_problems(recipe: Recipe) -> list[str]:
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
        (recipe.rollout.max_staleness in (0, 1), f"rollout.max_staleness must be 0 (on-policy) or 1 (one-step "
                                                 f"off-policy), got {recipe.rollout.max_staleness}."),
        (recipe.rollout.mismatch.cap > 1, f"rollout.mismatch.cap must be above 1, got {recipe.rollout.mismatch.cap}."),
        (recipe.rollout.vllm.timeout_s > 0, "rollout.vllm.timeout_s must be positive."),
        (recipe.rollout.vllm.request_retries >= 1, "rollout.vllm.request_retries must be at least 1."),
        (recipe.rollout.engine != "vllm_server" or recipe.lora.enabled,
         "rollout.engine vllm_server loads LoRA adapters only; turn lora.enabled on, or use rollout.engine vllm "
         "(colocated), which loads full weights."),
    ]
    problems = [message for ok, message in checks if not ok]
    problems += tracker_problems(recipe.logging)
    for i, src in enumerate([recipe.data.train] + ([recipe.data.heldout] if recipe.data.heldout else [])):
        name = "data.train" if i == 0 else "data.heldout"
        if (src.path is None) == (src.builtin is None):
            problems.append(f"{name}: give exactly one of `path` (your data file) or `builtin` (a generated task).")
    return problems


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
    """Read a YAML recipe (or a dict), apply `key=value` overrides, validate it whole, and return it.

    Plug-ins given as `module:Class` are imported relative to the recipe's directory and the working
    directory.
    """
    if raw is None:
        raw = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise RecipeError(f"recipe file {str(p)!r} does not exist.")
            try:
                raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
            except UnicodeDecodeError as exc:
                raise RecipeError(f"recipe {str(p)!r} is not UTF-8 text (invalid byte at offset {exc.start}).") from None
            except yaml.YAMLError as exc:
                raise RecipeError(f"recipe {str(p)!r} is not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise RecipeError(f"recipe {str(p)!r} must be a mapping of sections (run, model, data, loss, train, ...).")
    raw = _normalise_loss_section(dict(raw))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        raw = _normalise_loss_section(raw)
    problems: list[str] = []
    recipe = build_dataclass(Recipe, raw, problems=problems, hints=TRL_NAMES)
    problems += _range_problems(recipe)
    try:
        validate_plugins(recipe, [Path(path).resolve().parent] if path else [])
    except RecipeError as exc:
        problems += exc.problems
    if problems:
        raise RecipeError(*problems, source=str(path) if path is not None else "")  # every mistake at once
    return recipe


def validate_plugins(recipe: Recipe, search_dirs: list[Path]) -> None:
    """Every plug-in's name and params, and the attention kernel against the layout (no model, no torch
    work). The mistakes of all of them are raised together."""
    problems: list[str] = []

    def check(validate, *args):
        try:
            return validate(*args)
        except RecipeError as exc:
            problems.extend(exc.problems)

    loss = check(build_loss, recipe.loss, search_dirs)
    if recipe.rewards:
        check(lambda: validate_reward_terms(recipe.rewards, search_dirs=search_dirs))
    sampler = check(SAMPLERS.get, recipe.sampler.name, search_dirs)
    if sampler is not None:
        check(SAMPLERS.params, sampler, recipe.sampler.params, f"sampler.params ({recipe.sampler.name})")
    if recipe.rollout.engine != "hf":
        check(ENGINES.get, recipe.rollout.engine, search_dirs)
    if loss is not None and loss.data_kind == "groups" and loss.needs_reference and recipe.reference.precompute is True:
        problems.append("reference.precompute works on a fixed set of pairs; an online run samples new "
                        "completions every step. Set reference.precompute: false.")
    estimator = recipe.rollout.advantage_estimator
    if estimator is not None and loss is not None:
        if loss.data_kind != "groups" or not getattr(loss, "accepts_estimator", False):
            problems.append(f"rollout.advantage_estimator {estimator!r}: loss {recipe.loss[0].name!r} computes its "
                            f"own advantages (or trains on pairs); remove the key.")
        else:
            check(ADVANTAGE_ESTIMATORS.get, estimator)
    check(check_attention, recipe.model.attn_implementation, recipe.train.share_prompt, recipe.train.packing)
    if problems:
        raise RecipeError(*problems)
