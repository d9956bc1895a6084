"""The online mode of the one trainer: rollouts, rewards, group losses, samplers, checkpoints (tiny models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import recipe_from, tiny_recipe
from posttrain.callbacks import Callback
from posttrain.checkpoint_state import named_trainable
from posttrain.losses import register_loss
from posttrain.losses.grpo import GRPOLoss
from posttrain.plan import split_groups
from posttrain.rollout import Completion, HFGenerateEngine, RolloutRecord, SamplingParams, cut_at_stop
from posttrain.rollout.batch import completion_tensors
from posttrain.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def online_recipe(model_dir, out, loss="grpo", params=None, reward="online_rewards:letter_share", **sections):
    rollout = {"group_size": 4, "max_new_tokens": 8, "reward_workers": 0, **sections.pop("rollout", {})}
    train = {"lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "max_steps": 3, "lr_scheduler": "constant",
             **sections.pop("train", {})}
    return tiny_recipe(model_dir, out, loss={"name": loss, "params": params or {}},
                       data={"train": {"builtin": "tiny", "split": "train"},
                             "heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 32},
                             "template": "plain", "max_length": 64},
                       rewards=[{"name": reward}], rollout=rollout, train=train, **sections)


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_steps(out: Path) -> list[dict]:
    return [m for m in metrics_of(out) if "reward/mean" in m]


@pytest.fixture(autouse=True)
def _rewards_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


# ------------------------------------------------------------------------------------------- pieces
def test_cut_at_stop_keeps_the_stop_token_and_marks_truncation():
    assert cut_at_stop([5, 6, 2, 2, 2], {2}, 5) == Completion([5, 6, 2], truncated=False)
    assert cut_at_stop([5, 6, 7, 8], {2}, 4) == Completion([5, 6, 7, 8], truncated=True)
    assert cut_at_stop([2], {2}, 3) == Completion([2], truncated=False)


@pytest.mark.parametrize("static_cache", [True, False], ids=["static_cache", "generate"])
def test_hf_engine_returns_unpadded_completions_that_end_at_eos_or_the_limit(tiny_model_dir, static_cache):
    from posttrain.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    eos = model.config.eos_token_id
    engine = HFGenerateEngine(lambda: model, pad_id=eos, stop_ids=[eos], batch_size=3, static_cache=static_cache)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    torch.manual_seed(0)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0))
    assert len(out) == 4
    for c in out:
        assert 1 <= len(c.token_ids) <= 6
        assert c.truncated == (eos not in c.token_ids)
        if not c.truncated:
            assert c.token_ids.index(eos) == len(c.token_ids) - 1
    forced = engine.generate(prompts, SamplingParams(max_new_tokens=5, min_new_tokens=5))
    assert [len(c.token_ids) for c in forced] == [5, 5, 5, 5]  # min_new_tokens forbids EOS before the limit
    greedy1 = engine.generate(prompts, SamplingParams(max_new_tokens=6, greedy=True))
    greedy2 = engine.generate(prompts[::-1], SamplingParams(max_new_tokens=6, greedy=True))
    assert [c.token_ids for c in greedy1] == [c.token_ids for c in greedy2[::-1]]  # left padding does not leak


@pytest.mark.parametrize("static_cache", [True, False], ids=["static_cache", "generate"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_prefill_once_samples_what_a_full_prefill_samples(tiny_model_dir, dtype, static_cache):
    """Groups of repeated prompts of different lengths (left padding, a one-token prompt): the prompt computed
    once and its cache copied gives the same greedy tokens, and with the same seed the same sampled tokens, as
    a prefill of every copy, in either decode loop."""
    from posttrain.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype=dtype)
    eos = model.config.eos_token_id
    prompts = [[5, 6, 7]] * 3 + [[14]] * 2 + [[8, 9, 10, 11, 12]] * 3 + [[20, 21]]
    engines = [HFGenerateEngine(lambda: model, pad_id=eos, stop_ids=[eos], batch_size=16, prefill_once=once,
                                static_cache=static_cache) for once in (False, True)]
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids")
        calls.append(tuple(ids.shape) if ids is not None else None)
        return original(*args, **kwargs)

    model.forward = counting
    for params in (SamplingParams(max_new_tokens=6, greedy=True),
                   SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95)):
        outs = []
        for engine in engines:
            calls.clear()
            torch.manual_seed(0)
            outs.append([c.token_ids for c in engine.generate(prompts, params)])
            if engine.prefill_once:  # 4 distinct prompts prefilled once (all but the last token), then 9 rows
                assert calls[0] == (4, 4) and calls[1] == (9, 1), calls[:2]
            else:
                assert calls[0] == ((9, 4) if static_cache else (9, 5))
        assert outs[0] == outs[1], params
        assert len({tuple(t) for t in outs[1][:3]}) > 1 or params.greedy  # the copies sample independently


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_static_cache_loop_decodes_generates_greedy_tokens_exactly(tiny_model_dir, dtype):
    """posttrain's decode loop against transformers' generate on the same model and prompts (different lengths,
    repeated ones, a one-token prompt), with and without the prompt prefilled once: the same greedy tokens, and
    the same cut at EOS."""
    from posttrain.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype=dtype)
    eos = model.config.eos_token_id
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 400, (n,), generator=generator).tolist() for n in (1, 3, 7, 12, 5)]
    prompts = prompts + prompts[1:3] * 2
    params = SamplingParams(max_new_tokens=12, greedy=True)
    unstopped = HFGenerateEngine(lambda: model, pad_id=eos, stop_ids=[eos], static_cache=False).generate(prompts, params)
    stop = unstopped[0].token_ids[3]  # a token some rows emit: they stop early, the others run to the limit
    outs = {}
    for static_cache in (True, False):
        for once in (True, False):
            engine = HFGenerateEngine(lambda: model, pad_id=eos, stop_ids=[eos, stop], batch_size=16,
                                      prefill_once=once, static_cache=static_cache)
            outs[static_cache, once] = engine.generate(prompts, params)
    assert len({repr(v) for v in outs.values()}) == 1, outs
    assert not outs[True, True][0].truncated and len(outs[True, True][0].token_ids) <= 4


def test_sampling_distribution_equals_generates_warpers():
    """The next-token distribution of the static-cache loop (temperature, top-k, top-p) equals the one
    transformers' warpers give generate, on random logits with ties; `draw` samples it (chi-square, 40,000 draws)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from posttrain.rollout.decode import draw, next_token_distribution

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator) * 3
    logits[:, 10] = logits[:, 11]  # a tie
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.9, 20, 0.95), (1.3, 5, 1.0), (0.8, 0, 0.6)]:
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone()) if temperature != 1.0 else logits.clone()
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        theirs = torch.softmax(scores, dim=-1)
        ours = next_token_distribution(logits.clone(), temperature, top_k, top_p)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    probs = next_token_distribution(logits[:1].expand(40_000, -1), 0.9, 20, 0.95)
    torch.manual_seed(0)
    counts = torch.bincount(draw(probs), minlength=50).double()
    expected = probs[0].double() * 40_000
    assert counts[expected == 0].sum() == 0  # nothing outside the filtered support
    support = expected > 0
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # about 5 standard deviations of chi2(dof)


def test_decode_step_attention_equals_attention_over_repeated_heads():
    """One query position per row against a left-padded cache, grouped-query heads: the decode loop's attention
    equals softmax(q k^T / sqrt(d) + mask) v over key and value heads repeated per query head (float64), and
    under bf16 autocast it still computes in fp32 (the fp32 result to 1e-6)."""
    from posttrain.rollout.decode import decode_step_attention

    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, width, dim = 3, 4, 2, 7, 8
    query = torch.randn(rows, heads, 1, dim, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(rows, kv_heads, width, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(rows, 1, 1, width, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding
    mask[2, ..., :1] = False
    scores = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) / dim ** 0.5
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ value.repeat_interleave(2, dim=1)
    out, _ = decode_step_attention(None, query, key, value, mask, scaling=dim ** -0.5)
    assert out.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = decode_step_attention(None, query.float(), key.float(), value.float(), mask, scaling=dim ** -0.5)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast.double(), expected.transpose(1, 2), rtol=0, atol=1e-6)


def _lora_policy(model_dir, dtype, **lora):
    """The tiny model with a random LoRA adapter on every linear layer (B ~ N(0, 0.05), so it changes the output)."""
    import peft

    from posttrain.models import load_causal_lm

    torch.manual_seed(0)
    model = peft.get_peft_model(load_causal_lm(str(model_dir), dtype=dtype), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
    return model.eval()


@pytest.mark.parametrize("dtype,tolerance", [("float64", 1e-12), ("float32", 2e-5)])
def test_merged_adapters_give_the_adapter_forward_and_leave_the_weights_as_they_were(tiny_model_dir, dtype,
                                                                                     tolerance):
    """Inside `merged_adapter_weights` the model, adapters off, computes the adapter forward from W + s B A (logits
    to float rounding); afterwards the same parameter objects hold the same values, the adapters are on and
    trainable again, and the engine's greedy tokens with merged adapters are those without."""
    from posttrain.rollout.merged import merge_is_exact, merged_adapter_weights

    model = _lora_policy(tiny_model_dir, dtype)
    ids = torch.randint(5, 400, (3, 9), generator=torch.Generator().manual_seed(2))
    before = {name: (p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        with merged_adapter_weights(model) as merged:
            merged_logits = model(input_ids=ids).logits
    assert merged is True
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=tolerance, atol=tolerance)
    for name, p in model.named_parameters():
        original, values, requires_grad = before[name]
        assert p is original and torch.equal(p, values) and p.requires_grad == requires_grad, name
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapter_logits, rtol=0, atol=0)
    eos = model.config.eos_token_id
    prompts = [[5, 6, 7]] * 2 + [[8, 9, 10, 11, 12]] * 2 + [[20]]
    params = SamplingParams(max_new_tokens=8, greedy=True)
    outs = [[c.token_ids for c in HFGenerateEngine(lambda: model, pad_id=eos, stop_ids=[eos], merge_adapters=merge)
             .generate(prompts, params)] for merge in (True, False)]
    assert outs[0] == outs[1]
    assert merge_is_exact(model, "cpu")  # fp32 or float64 weights: `auto` merges
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not merge_is_exact(model, "cpu")


def test_merged_adapters_leave_dora_unmerged(tiny_model_dir):
    """DoRA's magnitude vector is not a W + s B A merge: the model is left as it is (and samples with adapters)."""
    from posttrain.rollout.merged import merged_adapter_weights

    model = _lora_policy(tiny_model_dir, "float32", use_dora=True)
    ids = torch.randint(5, 400, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with merged_adapter_weights(model) as merged:
            inside = model(input_ids=ids).logits
    assert merged is False
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)


def test_groups_are_split_whole_over_processes_and_micro_batches():
    groups = list(range(5))
    per_rank = [split_groups(groups, 2, rank, per_micro=2, n_micro=2) for rank in (0, 1)]
    assert per_rank[0] == [[0, 2], [4, None]] and per_rank[1] == [[1, 3], [None, None]]
    flat = [g for rank in per_rank for micro in rank for g in micro if g is not None]
    assert sorted(flat) == groups


def test_completion_layout_and_truncation_mask():
    records = [RolloutRecord(0, 0, [1, 2, 3], [7, 8], False, "", 0.0),
               RolloutRecord(0, 0, [1, 2, 3], [7, 9, 9], True, "", 0.0)]
    ids, mask = completion_tensors(records, masked_truncated=True)
    assert ids.tolist() == [[7, 8, 0], [7, 9, 9]] and mask.tolist() == [[1, 1, 0], [0, 0, 0]]
    _, kept = completion_tensors(records, masked_truncated=False)
    assert kept.tolist() == [[1, 1, 0], [1, 1, 1]]
    from posttrain.data.layout import build_sequence_rows

    rows = build_sequence_rows([(rec.prompt_ids[:3 - i], rec.completion_ids) for i, rec in enumerate(records)], 0)
    dense = torch.arange(8.0).reshape(2, 4)  # [N, L-1]: entry t-1 is the log-prob of token t
    # prompts of 3 and 2 tokens: completion token j sits at position P + j, so its entry is P - 1 + j
    assert rows.gather(dense).tolist() == [[2.0, 3.0, 0.0], [5.0, 6.0, 7.0]]


# ------------------------------------------------------------------------------------------- a loss that inspects its inputs
SEEN: list[dict] = []


@register_loss("test_inspecting_grpo")
class InspectingGRPO(GRPOLoss):
    """GRPO that records what the trainer fed it: the micro-batch's inputs and the step's global counts."""

    def step_loss(self, inputs, counts):
        real = inputs.completion_weight > 0
        SEEN.append({"log_ratio": (inputs.logps - inputs.old()).abs().max().item() if inputs.old_logps is not None
                     else None, "groups": inputs.group_index[real].tolist(), "rows": int(real.sum()),
                     "counts": counts, "advantages": inputs.advantages.clone(),
                     "rewards": inputs.rewards[real].tolist(),
                     "old_logps": inputs.old_logps[real].clone() if inputs.old_logps is not None else None,
                     "token_ids": inputs.token_ids[real].tolist(), "mask": inputs.mask[real].clone()})
        return super().step_loss(inputs, counts)


def test_grpo_trains_online_and_raises_heldout_greedy_pass_rate(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    raw = online_recipe(tiny_model_dir, out, train={"max_steps": 16},
                        sampler={"name": "uniform", "success_threshold": 0.85}, checkpoint={"every": 8})
    summary = Trainer(recipe_from(raw)).train()
    before, after = summary["heldout_before"]["pass@1"], summary["heldout_after"]["pass@1"]
    assert after >= before + 0.25, (before, after)  # greedy decoding moves to letter-only tokens
    steps = train_steps(out)
    assert len(steps) == 16
    for key in ("reward/mean", "reward/std", "groups/zero_variance_share", "pass@1", "completions/mean_length",
                "completions/truncated_share", "entropy", "clip_ratio/region_mean", "grad_norm", "time/generation",
                "time/train", "reward/online_rewards:letter_share"):
        assert key in steps[0], key
    assert {m["step"] for m in metrics_of(out) if "eval/pass@1" in m} == {0, 16}
    state = json.loads((out / "checkpoints" / "step-00000016" / "trainer_state.json").read_text())
    assert state["sampler"]["name"] == "uniform" and len(state["sampler"]["remaining"]) > 0
    greedy = (out / "eval" / "greedy-step-00000016.jsonl").read_text().splitlines()
    assert len(greedy) == 32 and {"completion", "reward", "success"} <= set(json.loads(greedy[0]))


def test_one_update_per_rollout_gives_a_ratio_of_exactly_one_and_whole_groups(tiny_model_dir, tmp_path):
    SEEN.clear()
    raw = online_recipe(tiny_model_dir, tmp_path / "run", loss="test_inspecting_grpo",
                        rollout={"recompute_old_logprobs": True}, train={"max_steps": 1, "batch_size": 4,
                                                                          "micro_batch_size": 2},
                        eval={"at_start": False, "at_end": False})
    Trainer(recipe_from(raw)).train()
    assert len(SEEN) == 2  # 4 groups, 2 per micro-batch
    assert all(s["log_ratio"] == 0.0 for s in SEEN)  # pi_old pass and training pass agree bit for bit
    for s in SEEN:
        counts = {g: s["groups"].count(g) for g in set(s["groups"])}
        assert set(counts.values()) == {4}  # whole groups of G = 4
        assert s["counts"].examples == 16  # global: all completions of the step
    assert sorted(g for s in SEEN for g in set(s["groups"])) == [0, 1, 2, 3]
    assert len({s["counts"] for s in SEEN}) == 1  # one set of counts for the whole step (all micro-batches)


def test_several_updates_per_rollout_use_the_old_policy(tiny_model_dir, tmp_path):
    SEEN.clear()
    raw = online_recipe(tiny_model_dir, tmp_path / "run", loss="test_inspecting_grpo",
                        rollout={"updates_per_batch": 2}, train={"max_steps": 1, "micro_batch_size": 4},
                        eval={"at_start": False, "at_end": False})
    Trainer(recipe_from(raw)).train()
    first, second = SEEN
    assert first["log_ratio"] == 0.0 and second["log_ratio"] > 0  # the second update sees pi_theta != pi_old
    assert torch.equal(first["advantages"], second["advantages"])  # one rollout batch, advantages computed once
    lines = train_steps(tmp_path / "run")
    assert "update2/loss" in lines[0] and lines[0]["learning_rate"] == 1e-2


WEIGHTS: dict[int, dict[str, torch.Tensor]] = {}


class TrainableAfterEachStep(Callback):
    def on_step_end(self, event):
        WEIGHTS[event.step] = {name: p.detach().clone() for name, p in event.trainable}


def completion_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Per-token log-probs of a completion under `model`: one plain forward of prompt + completion."""
    ids = torch.tensor([prompt_ids + completion_ids], device="cpu")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids):, None])[:, 0]


def test_one_step_off_policy_rollouts_train_on_the_previous_version_against_its_log_probs(tiny_model_dir, tmp_path):
    SEEN.clear()
    WEIGHTS.clear()
    out = tmp_path / "run"
    raw = online_recipe(tiny_model_dir, out, loss="test_inspecting_grpo", rollout={"max_staleness": 1},
                        train={"max_steps": 3, "micro_batch_size": 4}, eval={"at_start": False, "at_end": False},
                        run={"callbacks": ["test_online:TrainableAfterEachStep"]})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    batches: dict[int, list[RolloutRecord]] = {}
    finish = trainer.step.collector.finish

    def finish_and_keep(future, stats=None):
        records = finish(future, stats)
        batches.setdefault(trainer.current_step, []).extend(records)
        return records

    trainer.step.collector.finish = finish_and_keep
    model = trainer.peft_model
    WEIGHTS[0] = {name: p.detach().clone() for name, p in named_trainable(model)}
    trainer.train()
    assert [m["rollout/staleness"] for m in train_steps(out)] == [0.0, 1.0, 1.0]
    assert [{rec.policy_version for rec in batches[k]} for k in range(3)] == [{0}, {0}, {1}]
    assert SEEN[0]["old_logps"] is None  # on-policy first step, one update: pi_old is the current policy
    params = dict(named_trainable(model))
    model.eval()
    for k in (1, 2):  # step k trains on what version k - 1 sampled; pi_old is that version's forward
        seen, records = SEEN[k], batches[k]
        assert seen["log_ratio"] > 1e-4
        for version, close in ((k - 1, True), (k, False)):
            with torch.no_grad():
                for name, value in WEIGHTS[version].items():
                    params[name].copy_(value)
            for row, (group, ids) in enumerate(zip(seen["groups"], seen["token_ids"])):
                n = int(seen["mask"][row].sum())
                rec = next(r for r in records if r.group == group and r.completion_ids == ids[:n])
                gap = (completion_logps(model, rec.prompt_ids, rec.completion_ids)
                       - seen["old_logps"][row, :n].float()).abs().max().item()
                assert (gap < 1e-4) == close, (k, version, row, gap)


def test_zero_variance_filter_resamples_and_trains_only_on_informative_groups(tiny_model_dir, tmp_path):
    SEEN.clear()
    out = tmp_path / "run"
    raw = online_recipe(tiny_model_dir, out, loss="test_inspecting_grpo",
                        reward="online_rewards:letter_share_on_even_answers",
                        rollout={"filter_zero_variance": True, "max_resample_rounds": 3},
                        train={"max_steps": 2, "micro_batch_size": 4}, eval={"at_start": False, "at_end": False})
    Trainer(recipe_from(raw)).train()
    steps = train_steps(out)
    assert all(m["filter/dropped_groups"] >= 1 or m["groups/zero_variance_share"] == 0 for m in steps)
    assert sum(m["filter/resample_rounds"] for m in steps) >= 1
    for m in steps:
        assert m["filter/groups"] <= 4
    trained = 0
    for s in SEEN:  # every trained group has reward variance
        for g in set(s["groups"]):
            rewards = [r for r, h in zip(s["rewards"], s["groups"]) if h == g]
            assert max(rewards) - min(rewards) > 1e-6, rewards
            trained += 1
    assert trained == sum(m["filter/groups"] for m in steps) > 0


def test_truncated_completions_are_penalised_per_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    raw = online_recipe(tiny_model_dir, out, rollout={"truncated": "penalize", "truncated_reward": -1.0,
                                                      "max_new_tokens": 3},
                        train={"max_steps": 1}, eval={"at_start": False, "at_end": False})
    Trainer(recipe_from(raw)).train()
    (m,) = train_steps(out)
    share = m["completions/truncated_share"]
    assert share > 0.5  # a random tiny model rarely says EOS within 3 tokens
    assert m["reward/mean"] <= -share + (1 - share) + 1e-9  # truncated ones got -1, the others at most 1


@pytest.mark.parametrize("loss,params", [("grpo", {"loss_type": "cispo", "epsilon_high": 5.0}),
                                         ("grpo", {"loss_type": "sapo"}), ("gspo", {}), ("gmpo", {})])
def test_cispo_sapo_gspo_and_gmpo_train_online(tiny_model_dir, tmp_path, loss, params):
    raw = online_recipe(tiny_model_dir, tmp_path / "run", loss=loss, params=params, train={"max_steps": 16},
                        sampler={"name": "uniform", "success_threshold": 0.85})
    summary = Trainer(recipe_from(raw)).train()
    before, after = summary["heldout_before"]["pass@1"], summary["heldout_after"]["pass@1"]
    assert after >= before + 0.25, (before, after)  # the margin GRPO's own test asks for


@pytest.mark.parametrize("loss,params", [("gtpo", {}), ("copo", {}), ("grpo", {"beta": 0.04, "loss_type": "grpo"})])
def test_each_group_loss_runs_a_step_through_the_trainer(tiny_model_dir, tmp_path, loss, params):
    out = tmp_path / "run"
    raw = online_recipe(tiny_model_dir, out, loss=loss, params=params, reward="online_rewards:first_character_is_vowel",
                        rollout={"temperature": 1.0}, train={"max_steps": 2, "batch_size": 4, "micro_batch_size": 2},
                        eval={"at_start": False, "at_end": False})
    Trainer(recipe_from(raw)).train()
    steps = train_steps(out)
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    if params.get("beta"):
        assert "kl" in steps[0] and steps[1]["kl"] >= 0


def test_copo_needs_two_prompts_per_step(tiny_model_dir, tmp_path):
    raw = online_recipe(tiny_model_dir, tmp_path / "run", loss="copo", train={"max_steps": 1, "batch_size": 1,
                                                                              "micro_batch_size": 1},
                        eval={"at_start": False, "at_end": False})
    from posttrain.errors import RecipeError

    with pytest.raises(RecipeError, match="2 prompts.*train.batch_size"):
        Trainer(recipe_from(raw)).train()


def test_an_online_loss_without_rewards_is_refused(tiny_model_dir, tmp_path):
    from posttrain.errors import RecipeError

    raw = online_recipe(tiny_model_dir, tmp_path / "run")
    raw["rewards"] = []
    with pytest.raises(RecipeError, match="needs at least one reward"):
        Trainer(recipe_from(raw)).train()


# ------------------------------------------------------------------------------------------- resume
def _run_cli(recipe: Path, *extra, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe), *extra], capture_output=True,
                          text=True, env=env, cwd=recipe.parent, timeout=600)


def test_kill_after_a_checkpoint_then_resume_restores_the_vade_sampler(tiny_model_dir, tmp_path):
    shutil.copy(TESTS / "online_rewards.py", tmp_path / "online_rewards.py")  # found beside the recipe
    runs = {}
    for name in ("full", "killed"):
        out = tmp_path / name
        raw = online_recipe(tiny_model_dir, out, sampler={"name": "vade", "success_threshold": 0.9},
                            rollout={"reward_workers": 1}, train={"max_steps": 4}, checkpoint={"every": 2},
                            eval={"at_start": False, "at_end": False}, logging={"progress_bar": False,
                                                                               "report_to": ["jsonl"]})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        runs[name] = (path, out)
    assert _run_cli(runs["full"][0]).returncode == 0
    killed = _run_cli(runs["killed"][0], env={"POSTTRAIN_KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode != 0 and not (runs["killed"][1] / "summary.json").exists()
    resumed = _run_cli(runs["killed"][0], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def final_state(out):
        return json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["sampler"]

    assert final_state(runs["full"][1]) == final_state(runs["killed"][1])
    full, again = train_steps(runs["full"][1]), train_steps(runs["killed"][1])
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(full, again):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-8)


# ------------------------------------------------------------------------------------------- shipped recipes
def _online_recipes() -> list[str]:
    from posttrain.recipe import load_recipe
    from posttrain.losses import build_loss

    names = []
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if build_loss(load_recipe(path).loss).data_kind == "groups":
            names.append(path.name)
    return names


@pytest.mark.parametrize("name", _online_recipes())
def test_each_shipped_online_recipe_runs_a_step_on_a_tiny_model(name, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name data relative to the repository root
    raw = yaml.safe_load((ROOT / "recipes" / name).read_text())
    data = raw["data"]
    data["train"] = {**data["train"], "limit": 8}
    data["heldout"] = {**data["heldout"], "limit": 4}
    raw.update(run={"output_dir": str(tmp_path / "run"), "seed": 0, "num_threads": 1},
               model={**raw["model"], "name_or_path": str(tiny_model_dir)}, lora={**raw["lora"], "r": 4},
               rollout={**raw["rollout"], "group_size": 2, "max_new_tokens": 4, "reward_workers": 0},
               train={**raw["train"], "batch_size": 2, "micro_batch_size": 1, "max_steps": 1},
               logging={"progress_bar": False, "report_to": ["jsonl"]}, checkpoint={"every": 0})
    summary = Trainer(recipe_from(raw)).train()
    assert summary["steps"] == 1 and summary["heldout_after"]["num_prompts"] == 4
