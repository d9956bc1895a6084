"""Rollouts of online RL: generation engines and the collection of scored groups."""

from posttrain.rollout.collect import RolloutCollector, RolloutRecord, RolloutStats
from posttrain.rollout.engine import (ENGINES, Completion, EngineContext, GenerationEngine, HFGenerateEngine,
                                      SamplingParams, cut_at_stop)
from posttrain.rollout.vllm_engine import VLLMEngine, VLLMServerEngine

__all__ = ["ENGINES", "Completion", "EngineContext", "GenerationEngine", "HFGenerateEngine", "RolloutCollector", "RolloutRecord", "RolloutStats",
           "SamplingParams", "VLLMEngine", "VLLMServerEngine", "cut_at_stop"]
