"""Setting up an online run: prompts, their token ids, the generation engine and the rollout collectors.
Called once by the trainer; each function takes what it uses."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from posttrain.data.prompts import load_prompt_examples
from posttrain.data.tokenize import example_prompt_ids
from posttrain.errors import DataError, RecipeError
from posttrain.rollout import ENGINES, EngineContext, GenerationEngine, RolloutCollector, SamplingParams


def sampling_params(rollout, greedy: bool = False) -> SamplingParams:
    max_new = (rollout.eval_max_new_tokens or rollout.max_new_tokens) if greedy else rollout.max_new_tokens
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=0 if greedy else rollout.min_new_tokens,
                          temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k, greedy=greedy)


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-turn token the tokenisation contract appends (the tokenizer's EOS)."""
    if tokenizer.eos_token_id is None:
        raise RecipeError("the tokenizer has no EOS token, so a generated completion could never end; set one.")
    return [tokenizer.eos_token_id]


def tokenize_prompts(examples: list, tokenizer, template: str, max_prompt_length: Optional[int]) -> list[list[int]]:
    """Rendered prompt ids (the tokenisation contract's prompt side; the prompt keeps its last tokens)."""
    out = []
    for example in examples:
        ids = example_prompt_ids(tokenizer, example, template)
        out.append(ids[-max_prompt_length:] if max_prompt_length else ids)
    return out


def load_examples(source, invalid_rows: str, skipped: Optional[Path], what: str) -> list:
    path = source.path if source.path else f"builtin:{source.builtin}"
    examples, _ = load_prompt_examples(path, source.format, source.split, source.start, source.limit, invalid_rows,
                                       skipped, what, source.config)
    if source.builtin and source.num_rows is not None:
        examples = examples[:source.num_rows]
    if not examples:
        raise DataError(f"{what}: no usable prompts in {path}. Check the file and its fields.")
    return examples


def build_engine(name: str, context: EngineContext, search_dirs: list[Path]) -> GenerationEngine:
    """The recipe's generation engine: `hf`, or a user's `module.path:Class` (built from the context)."""
    return ENGINES.get(name, search_dirs).from_context(context)


def build_collector(engine, rewards, examples, prompt_ids, tokenizer, success_component: str,
                    success_threshold: float, truncated: str, truncated_reward: float, world: int,
                    rank: int) -> RolloutCollector:
    return RolloutCollector(engine, rewards, examples, prompt_ids,
                            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), success_component,
                            success_threshold, truncated, truncated_reward, world, rank, gather_objects)


def gather_objects(records: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(records)


def broadcast(value):
    from accelerate.utils import broadcast_object_list

    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]
