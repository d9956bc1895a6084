"""From prompt indices to scored groups: generate G completions per prompt and score them.

Each process generates and scores the groups of its share of the prompts (prompt k of the step goes
to process k mod world), then every process receives every record, so the whole rollout batch is
known everywhere: advantages and batch statistics are computed on all of it before it is split.
A group never crosses processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from posttrain.plan import round_robin
from posttrain.rollout.engine import GenerationEngine, SamplingParams


@dataclass
class RolloutRecord:
    """One scored completion. `group` numbers the prompts of a step (0..B-1); `index` is the dataset index."""

    index: int
    group: int
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool
    text: str
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    answer: Optional[str] = None
    success: bool = False
    demonstration: bool = False  # a gold demonstration that replaced its group's rollouts (HPT)
    engine_logprobs: Optional[list[float]] = None  # the engine's log-probs of the completion (None: the trainer's)


@dataclass
class RolloutStats:
    generation_seconds: float = 0.0
    reward_seconds: float = 0.0
    gather_seconds: float = 0.0  # ZeRO-3: parameters gathered for generation (inside generation_seconds)


class RolloutCollector:
    """`examples[i]` is a PromptExample (for the rewards), `prompt_ids[i]` its rendered token ids.

    `rewards.score(texts, examples) -> list[RewardResult]` (posttrain.rewards.RewardSet); a completion
    is a success when `components[success_component] >= success_threshold` (the sampler's and pass@1's
    notion of "correct"). `truncated: penalize` replaces the reward of a truncated completion by
    `truncated_reward`; `mask` and `keep` leave the reward (the trainer masks the loss for `mask`).
    """

    def __init__(self, engine: GenerationEngine, rewards, examples: list, prompt_ids: list[list[int]], decode: Callable,
                 success_component: str, success_threshold: float, truncated: str = "keep",
                 truncated_reward: float = 0.0, world: int = 1, rank: int = 0, gather_object: Optional[Callable] = None):
        self.engine, self.rewards, self.examples, self.prompt_ids = engine, rewards, examples, prompt_ids
        self.decode = decode
        self.success_component, self.success_threshold = success_component, success_threshold
        self.truncated, self.truncated_reward = truncated, truncated_reward
        self.world, self.rank = world, rank
        self.gather_object = gather_object

    def collect(self, indices: list[int], group_size: int, params: SamplingParams, first_group: int = 0,
                stats: Optional[RolloutStats] = None) -> list[RolloutRecord]:
        """Records of all groups, in group order, on every process."""
        stats = stats if stats is not None else RolloutStats()
        mine = [x for x in round_robin([(first_group + k, i) for k, i in enumerate(indices)], self.rank, self.world)
                if x is not None]
        local = self._generate_and_score(mine, group_size, params, stats) if mine else []
        if self.world == 1:
            return local
        t0 = time.time()
        records = self.gather_object(local)
        stats.gather_seconds += time.time() - t0
        return sorted(records, key=lambda r: r.group)

    def _generate_and_score(self, mine, group_size, params, stats) -> list[RolloutRecord]:
        prompts = [self.prompt_ids[i] for _, i in mine for _ in range(group_size)]
        t0 = time.time()
        completions = self.engine.generate(prompts, params)
        stats.generation_seconds += time.time() - t0
        texts = [self.decode(c.token_ids) for c in completions]
        examples = [self.examples[i] for _, i in mine for _ in range(group_size)]
        t0 = time.time()
        results = self.rewards.score(texts, examples)
        stats.reward_seconds += time.time() - t0
        records = []
        for k, (completion, text, result) in enumerate(zip(completions, texts, results)):
            group, index = mine[k // group_size]
            reward = float(result.score)
            if completion.truncated and self.truncated == "penalize":
                reward = float(self.truncated_reward)
            components = dict(result.components)
            success = components.get(self.success_component, reward) >= self.success_threshold
            records.append(RolloutRecord(index, group, self.prompt_ids[index], completion.token_ids,
                                         completion.truncated, text, reward, components, result.answer, success,
                                         engine_logprobs=completion.logprobs))
        return records
