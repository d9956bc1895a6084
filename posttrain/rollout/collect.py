"""From prompt indices to scored groups: generate G completions per prompt and score them.

Each process generates and scores the groups of its share of the prompts (prompt k of the step goes
to process k mod world), then every process receives every record, so the whole rollout batch is
known everywhere: advantages and batch statistics are computed on all of it before it is split.
A group never crosses processes.
"""

from __future__ import annotations

import concurrent.futures
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
    policy_version: int = 0  # the policy version (optimiser steps taken) that sampled it


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
        self.pool: Optional[concurrent.futures.ThreadPoolExecutor] = None  # background rollouts

    def collect(self, indices: list[int], group_size: int, params: SamplingParams, first_group: int = 0,
                stats: Optional[RolloutStats] = None, version: int = 0) -> list[RolloutRecord]:
        """Records of all groups, in group order, on every process; `version` is the policy version sampling."""
        return self.finish(self.start(indices, group_size, params, first_group, version), stats)

    def start(self, indices: list[int], group_size: int, params: SamplingParams, first_group: int = 0,
              version: int = 0, background: bool = False) -> concurrent.futures.Future:
        """Generate and score this process's share of the groups: on a background thread when `background` (the
        engine must be `concurrent`; it samples the weights it holds, without a sync), else now. `finish` gathers
        the result; nothing here talks to the other processes, so training may run while a background rollout
        goes on."""
        mine = [x for x in round_robin([(first_group + k, i) for k, i in enumerate(indices)], self.rank, self.world)
                if x is not None]
        if background:
            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-rollout")
            return self.pool.submit(self._generate_and_score, mine, group_size, params, version, True)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(self._generate_and_score(mine, group_size, params, version, False))
        return done

    def finish(self, pending: concurrent.futures.Future, stats: Optional[RolloutStats] = None) -> list[RolloutRecord]:
        """The records of a started rollout, of all processes, in group order (a collective when world > 1)."""
        stats = stats if stats is not None else RolloutStats()
        local, generation_seconds, reward_seconds = pending.result()
        stats.generation_seconds += generation_seconds
        stats.reward_seconds += reward_seconds
        if self.world == 1:
            return local
        t0 = time.time()
        records = self.gather_object(local)
        stats.gather_seconds += time.time() - t0
        return sorted(records, key=lambda r: r.group)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _generate_and_score(self, mine, group_size, params, version: int,
                            held: bool) -> tuple[list[RolloutRecord], float, float]:
        if not mine:
            return [], 0.0, 0.0
        prompts = [self.prompt_ids[i] for _, i in mine for _ in range(group_size)]
        t0 = time.time()
        completions = (self.engine.generate_held if held else self.engine.generate)(prompts, params)
        generation_seconds = time.time() - t0
        texts = [self.decode(c.token_ids) for c in completions]
        examples = [self.examples[i] for _, i in mine for _ in range(group_size)]
        t0 = time.time()
        results = self.rewards.score(texts, examples)
        reward_seconds = time.time() - t0
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
                                         engine_logprobs=completion.logprobs,
                                         policy_version=version if completion.policy_version is None
                                         else completion.policy_version))
        return records, generation_seconds, reward_seconds
