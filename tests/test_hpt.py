"""HPT (spec section 10): the switch, a group with at most gamma correct rollouts trained exactly by SFT on its
gold demonstration and the others exactly by the policy gradient, accumulation invariance, the per-step
shares, and a clear error for prompt data without a gold solution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import recipe_from, tiny_recipe
from posttrain.config import LossTerm
from posttrain.core import StepCounts
from posttrain.errors import DataError
from posttrain.examples import PromptExample
from posttrain.losses import build_loss
from posttrain.losses.group import GroupLossInputs, RolloutBatch
from posttrain.losses.hpt import switch_to_sft
from posttrain.rollout import RolloutRecord

F64 = torch.float64
MAX_LEN = 4


def test_the_switch_follows_the_spec_table():
    # spec section 10, worked example: gamma 0 -> SFT only at k = 0; gamma 2 -> SFT at k <= 2
    assert [switch_to_sft(k, 0) for k in (0, 1, 3, 8)] == [True, False, False, False]
    assert [switch_to_sft(k, 2) for k in (0, 2, 3, 8)] == [True, True, False, False]


def _hpt(**params):
    return build_loss([LossTerm(name="hpt", params={"max_completion_length": MAX_LEN, **params})])


def _records():
    """Two prompts x 3 rollouts: prompt 0 has no correct rollout (SFT under gamma 0), prompt 1 has two."""
    rows = []
    for group, successes in ((0, [False, False, False]), (1, [True, False, True])):
        for j, ok in enumerate(successes):
            rows.append(RolloutRecord(index=group, group=group, prompt_ids=[5, 6], completion_ids=[7 + j] * (j + 1),
                                      truncated=False, text="x", reward=float(ok), success=ok))
    return rows


def _plugin_with_demonstrations(tokenizer, **params):
    plugin = _hpt(**params)
    examples = [PromptExample("1 + 1 =", "2", "f", 1, {"solution": " 2"}),
                PromptExample("2 + 2 =", "4", "f", 2, {"solution": " 4"})]
    plugin.prepare_examples(examples, tokenizer, "plain")
    return plugin


def _step_inputs(plugin, records, rows, weight=None):
    width = max(len(r.completion_ids) for r in records)
    mask = torch.zeros(len(records), width, dtype=F64)
    for i, r in enumerate(records):
        mask[i, :len(r.completion_ids)] = 1
    batch = RolloutBatch(torch.tensor([r.reward for r in records], dtype=F64),
                         torch.tensor([r.group for r in records]), mask=mask,
                         extras={"demonstration": torch.tensor([r.demonstration for r in records])})
    adv = plugin.compute_advantages(batch)
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(len(records), width, generator=g, dtype=F64) * mask
    old = logps - 0.1 * torch.rand(len(records), width, generator=g, dtype=F64) * mask
    index = torch.tensor(rows)
    w = torch.ones(len(rows), dtype=F64) if weight is None else weight
    inputs = GroupLossInputs(logps=logps[index], mask=mask[index], advantages=adv[index], completion_weight=w,
                             old_logps=old[index], group_index=batch.group_index[index])
    return inputs, logps, old, mask, batch


def test_a_failed_prompt_trains_exactly_sft_on_its_gold_and_the_others_their_policy_gradient(tokenizer):
    plugin = _plugin_with_demonstrations(tokenizer, sft_coef=0.3)
    records, shares = plugin.prepare_rollouts(_records())
    assert shares == {"hpt/sft_share": 0.5, "hpt/rl_share": 0.5}
    demo, *rl = records
    gold_prompt, gold_completion, _ = plugin.demonstrations[0]
    assert demo.demonstration and demo.completion_ids == gold_completion and demo.prompt_ids == gold_prompt
    assert tokenizer.decode(gold_completion) == " 2" + tokenizer.eos_token  # the gold text, as an SFT row
    assert [r.group for r in rl] == [1, 1, 1] and not any(r.demonstration for r in rl)
    inputs, logps, old, mask, batch = _step_inputs(plugin, records, list(range(4)))
    out = plugin.step_loss(inputs, StepCounts(examples=4.0, tokens=float(mask.sum())))
    # By hand: L_SFT = token mean of -lp over the demonstration; L_PG over the 3 RL rollouts (A = r - 2/3)
    sft = -(logps[0] * mask[0]).sum() / mask[0].sum()
    adv = torch.tensor([1.0, 0.0, 1.0], dtype=F64) - 2 / 3
    rho = torch.exp(logps[1:] - old[1:])
    pg = (-adv[:, None] * rho * mask[1:]).sum() / (3 * MAX_LEN)
    assert out.loss.item() == pytest.approx((pg + 0.3 * sft).item(), rel=1e-12)


def test_the_mixed_loss_does_not_depend_on_the_micro_batch_split(tokenizer):
    plugin = _plugin_with_demonstrations(tokenizer)
    records, _ = plugin.prepare_rollouts(_records())
    counts = StepCounts(examples=4.0, tokens=1.0)
    whole = _step_inputs(plugin, records, [0, 1, 2, 3])[0]
    one_by_one = [_step_inputs(plugin, records, [i])[0] for i in range(4)]
    total = sum(plugin.step_loss(x, counts).loss for x in one_by_one)
    assert total.item() == pytest.approx(plugin.step_loss(whole, counts).loss.item(), rel=1e-6)


def test_prompt_data_without_a_gold_solution_is_an_error_before_any_model_loads(tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    import posttrain.models
    from posttrain.trainer import Trainer

    monkeypatch.setattr(posttrain.models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2", "solution": "2"}) + "\n"
                    + json.dumps({"prompt": "2 + 2 =", "answer": "4"}) + "\n")
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": "hpt", "params": {"max_completion_length": 4}},
                      rewards=[{"name": "exact_match"}], data={"train": {"path": str(data)}, "heldout": None},
                      rollout={"group_size": 2, "max_new_tokens": 4, "reward_workers": 0},
                      train={"batch_size": 2, "micro_batch_size": 1, "max_steps": 1})
    with pytest.raises(DataError, match=r"prompts.jsonl, row 2: no `solution`"):
        Trainer(recipe_from(raw)).setup()


def test_hpt_logs_the_shares_of_prompts_trained_by_sft_and_rl(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.trainer import Trainer

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run",
                      loss={"name": "hpt", "params": {"max_completion_length": 8, "switch_gate": 2}},
                      rewards=[{"name": "online_rewards:letter_share"}],
                      data={"train": {"builtin": "tiny", "split": "train"}, "heldout": None, "template": "plain"},
                      rollout={"group_size": 4, "max_new_tokens": 8, "reward_workers": 0},
                      sampler={"name": "uniform", "success_threshold": 0.99},
                      train={"batch_size": 4, "micro_batch_size": 2, "max_steps": 3, "lr": 1e-2},
                      logging={"report_to": ["jsonl"], "progress_bar": False, "completions": True})
    Trainer(recipe_from(raw)).train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    rollouts = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 4 * 4  # steps x prompts x G, every rollout logged
    for step, line in enumerate(lines, start=1):
        groups = {}
        for rec in (r for r in rollouts if r["step"] == step):
            groups.setdefault(rec["prompt_index"], []).append(rec)
        sft = [g for g in groups.values() if g[0]["trained_by"] == "sft"]
        assert all(sum(r["success"] for r in g) <= 2 for g in sft)  # the switch: at most gamma = 2 correct
        assert all(sum(r["success"] for r in g) > 2 for g in groups.values() if g[0]["trained_by"] == "rl")
        assert len(sft) / len(groups) == pytest.approx(line["hpt/sft_share"])
    assert len(lines) == 3
    for line in lines:
        assert line["hpt/sft_share"] + line["hpt/rl_share"] == pytest.approx(1.0)
        assert line["hpt/sft_share"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert any(line["hpt/sft_share"] > 0 for line in lines)  # few all-letter completions: SFT on many prompts
