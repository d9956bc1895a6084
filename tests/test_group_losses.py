"""Group (online RL) loss plug-ins: GRPO (+ DAPO / Dr. GRPO / BNPO), GTPO, COPO. All in float64.

- each loss equals its spec worked example (spec sections 6, 7, 8) to rtol 1e-9;
- the step loss (`plugin.step_loss(inputs, counts)`, globally normalised) and its autograd equal the paper
  formula and its gradient to 1e-9 (clipping active, KL on);
- the unified core's gradient (`backward_through_coefficients`: c = -dL/dlp, then -sum c lp backpropagated)
  equals autograd of the step loss to 1e-9 for every registered group loss;
- GRPO equals TRL 1.16's `GRPOTrainer._compute_loss` (a real trainer on a tiny model, per-token
  log-probs injected) for loss types grpo, bnpo, dr_grpo, dapo, in value and gradient;
- with one update per rollout batch the ratio is exactly 1 and clipping never triggers;
- global normalisation: the micro-batch shares add up to the full-batch loss and gradient;
- the advantage estimators (leave_one_out by hand, group_mean_std = TRL's group normalisation).
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import LossTerm
from posttrain.core import StepCounts, backward_through_coefficients
from posttrain.errors import RecipeError
from posttrain.losses import ADVANTAGE_ESTIMATORS, build_loss
from posttrain.losses.group import (GroupLossInputs, RolloutBatch, group_normalised_advantages, group_std,
                                    ppo_clip)
from posttrain.losses.gtpo import conflict_weights

RTOL = 1e-9
DT = torch.float64


def close(actual, expected, rtol=RTOL, atol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=DT), torch.as_tensor(expected, dtype=DT), rtol=rtol,
                               atol=atol)


def loss(name: str, **params):
    return build_loss([LossTerm(name=name, weight=1.0, params=params)])


def pad(rows, width):
    values = torch.zeros(len(rows), width, dtype=DT)
    mask = torch.zeros(len(rows), width, dtype=DT)
    for i, row in enumerate(rows):
        values[i, :len(row)] = torch.tensor(row, dtype=DT)
        mask[i, :len(row)] = 1
    return values, mask


def inputs_for(logps, mask, advantages, old=None, ref=None, group_index=None, weight=None):
    n = logps.shape[0]
    weight = torch.ones(n, dtype=DT) if weight is None else weight
    return GroupLossInputs(logps=logps, mask=mask, advantages=advantages, completion_weight=weight, old_logps=old,
                           ref_logps=ref, group_index=group_index)


def counts_of(inputs: GroupLossInputs) -> StepCounts:
    """The step's counts when the micro-batch is the whole step: its real completions and their tokens."""
    weight = inputs.completion_weight
    return StepCounts(examples=float(weight.sum()), tokens=float((inputs.mask * weight[:, None]).sum()))


def step_loss(plugin, inputs: GroupLossInputs, counts: StepCounts | None = None):
    """The micro-batch's share of the step loss (a StepLoss), by default with the micro-batch as the step."""
    return plugin.step_loss(inputs, counts_of(inputs) if counts is None else counts)


def grad_of(fn, logps):
    leaf = logps.detach().clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


# ----------------------------------------------------------------------------------------------------
# GRPO: spec section 6 worked example (G = 4, beta 0.04, eps 0.2)
# ----------------------------------------------------------------------------------------------------

SPEC_NEW, SPEC_MASK = pad([[-0.5, -0.4], [-0.3, -0.9, -0.2], [-0.7], [-0.6, -0.1]], 3)
SPEC_OLD, _ = pad([[-0.6, -0.4], [-0.5, -0.9, -0.2], [-0.7], [-0.9, -0.1]], 3)
SPEC_REF, _ = pad([[-0.55, -0.5], [-0.3, -1.0, -0.25], [-0.6], [-0.6, -0.2]], 3)
SPEC_REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=DT)
ONE_GROUP = torch.zeros(4, dtype=torch.long)


def test_grpo_advantages_spec():
    adv = group_normalised_advantages(SPEC_REWARDS, ONE_GROUP, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(adv, [a, -a, -a, a])
    close(adv[0], 0.865875, rtol=1e-6)
    close(group_normalised_advantages(SPEC_REWARDS, ONE_GROUP, "none"), [0.5, -0.5, -0.5, 0.5])
    close(group_std(SPEC_REWARDS, ONE_GROUP)[0], 0.5773502691896257)


@pytest.mark.parametrize("loss_type,params,expected", [
    ("grpo", {}, -0.0169279460),
    ("bnpo", {}, -0.0089558888),
    ("dapo", {}, -0.0089558888),
    ("dr_grpo", {"max_completion_length": 4}, -0.0044779444),
])
def test_grpo_spec_values(loss_type, params, expected):
    plugin = loss("grpo", beta=0.04, loss_type=loss_type, use_bias_correction_kl=False, **params)
    adv = plugin.compute_advantages(RolloutBatch(SPEC_REWARDS, ONE_GROUP))
    out = step_loss(plugin, inputs_for(SPEC_NEW.clone().requires_grad_(), SPEC_MASK, adv, SPEC_OLD, SPEC_REF))
    close(out.loss, expected, rtol=1e-8)  # the spec prints 10 decimals
    # the full-precision values of the spec's script (Appendix B)
    full = {"grpo": -0.016927945990148685, "bnpo": -0.008955888827459874, "dapo": -0.008955888827459874,
            "dr_grpo": -0.004477944413729937}[loss_type]
    close(out.loss, full)


def test_grpo_spec_bias_corrected_kl_and_dapo_clip_higher():
    plugin = loss("grpo", beta=0.04, loss_type="grpo")  # TRL 1.16 default use_bias_correction_kl=True
    adv = plugin.compute_advantages(RolloutBatch(SPEC_REWARDS, ONE_GROUP))
    out = step_loss(plugin, inputs_for(SPEC_NEW.clone().requires_grad_(), SPEC_MASK, adv, SPEC_OLD, SPEC_REF))
    close(out.loss, -0.0169272995, rtol=1e-8)
    dapo = loss("grpo", beta=0.0, epsilon_high=0.28)  # defaults: loss_type dapo
    out = step_loss(dapo, inputs_for(SPEC_NEW.clone().requires_grad_(), SPEC_MASK, adv, SPEC_OLD))
    close(out.loss, -0.01772535323099167)
    assert not dapo.needs_reference and plugin.needs_reference


def test_grpo_spec_clipping_metrics():
    """Seq1 token 0 (ratio 1.2214, A < 0) keeps the unclipped branch; seq3 token 0 (1.3499, A > 0) is clipped."""
    plugin = loss("grpo", beta=0.04, loss_type="grpo")
    adv = plugin.compute_advantages(RolloutBatch(SPEC_REWARDS, ONE_GROUP))
    out = step_loss(plugin, inputs_for(SPEC_NEW.clone().requires_grad_(), SPEC_MASK, adv, SPEC_OLD, SPEC_REF))
    close(out.metrics["clip_ratio/high_mean"], [0, 0, 0, 0.5])
    close(out.metrics["clip_ratio/low_mean"], [0, 0, 0, 0])
    per_token, stable = ppo_clip(torch.exp(SPEC_NEW - SPEC_OLD), adv[:, None], 0.2, 0.2)
    assert stable[1, 0] == 1 and stable[3, 0] == 0
    d = SPEC_REF - SPEC_NEW
    token_loss = per_token + 0.04 * (torch.exp(d) - d - 1)
    close(token_loss[0, :2], [-0.956891, -0.865682], rtol=1e-6)
    close(token_loss[1], [1.057583, 0.866069, 0.865925], rtol=1e-6)
    close(token_loss[3, :2], [-1.039051, -0.865682], rtol=1e-6)


def test_scale_rewards_match_trl_formula():
    """group / batch / none equal TRL 1.16's advantage block (Bessel-corrected std, + 1e-4); a zero-variance
    group gets 0. TRL's `nanstd` computes the Bessel factor count / (count - 1) in float32 (an int tensor
    divided by an int tensor), so in float64 it agrees to ~1e-8 only; the exact float64 formula to 1e-9."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 0.0, 0.3, 0.9, 0.2], dtype=DT)
    g = 4
    index = torch.arange(12) // g
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    exact = {"group": (rewards - mean) / (rewards.view(-1, g).std(1, correction=1).repeat_interleave(g) + 1e-4),
             "batch": (rewards - mean) / (rewards.std(correction=1) + 1e-4),
             "none": rewards - mean}
    trl = {"group": (rewards - mean) / (nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g) + 1e-4),
           "batch": (rewards - mean) / (nanstd(rewards) + 1e-4),
           "none": rewards - mean}
    for mode in exact:
        close(group_normalised_advantages(rewards, index, mode), exact[mode])
        close(group_normalised_advantages(rewards, index, mode), trl[mode], rtol=1e-7)
    expected = exact
    assert torch.all(group_normalised_advantages(rewards, index, "group")[4:8] == 0)
    shuffled = torch.randperm(12, generator=torch.Generator().manual_seed(0))  # groups need not be contiguous
    close(group_normalised_advantages(rewards[shuffled], index[shuffled], "group"), expected["group"][shuffled])


# ----------------------------------------------------------------------------------------------------
# GRPO: gradient = autograd of the paper formula; global normalisation; on-policy ratio
# ----------------------------------------------------------------------------------------------------

def random_rollout(seed: int = 0, groups: int = 2, g: int = 4, width: int = 6):
    gen = torch.Generator().manual_seed(seed)
    n = groups * g
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(DT)
    new = -torch.rand(n, width, generator=gen, dtype=DT) * 2 * mask
    old = (new + 0.4 * torch.randn(n, width, generator=gen, dtype=DT)) * mask  # ratios far outside 1 +- 0.2
    ref = (new + 0.3 * torch.randn(n, width, generator=gen, dtype=DT)) * mask
    rewards = torch.randint(0, 2, (n,), generator=gen).to(DT)
    rewards[0], rewards[1] = 1.0, 0.0  # no all-equal first group
    index = torch.arange(n) // g
    return new, old, ref, mask, rewards, index


def grpo_paper_loss(lp, old, ref, mask, adv, *, loss_type, beta, eps_low, eps_high, bias, level, max_len=None):
    """TRL 1.16 `_compute_loss` arithmetic written out (one micro-batch, one process)."""
    adv = adv[:, None]
    log_ratio = lp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token = per_token + beta * (kl * coef_1 if bias else kl)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mask.sum()
    return (per_token * mask).sum() / (per_token.shape[0] * max_len)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_gradient_equals_autograd_of_paper_formula(loss_type, bias, level):
    new, old, ref, mask, rewards, index = random_rollout(0)
    extra = {"max_completion_length": 7} if loss_type == "dr_grpo" else {}
    plugin = loss("grpo", beta=0.04, loss_type=loss_type, epsilon_high=0.28, use_bias_correction_kl=bias,
                  importance_sampling_level=level, **extra)
    adv = plugin.compute_advantages(RolloutBatch(rewards, index))
    ours, g_ours = grad_of(lambda lp: step_loss(plugin, inputs_for(lp, mask, adv, old, ref)).loss, new)
    paper, g_paper = grad_of(lambda lp: grpo_paper_loss(lp, old, ref, mask, adv, loss_type=loss_type, beta=0.04,
                                                        eps_low=0.2, eps_high=0.28, bias=bias, level=level,
                                                        max_len=7), new)
    close(ours, paper)
    close(g_ours, g_paper)
    if level == "token":  # the example really exercises both clip sides
        coef = torch.exp(new - old)
        a = adv[:, None]
        assert (((coef > 1.28) & (a > 0)) * mask).sum() > 0 and (((coef < 0.8) & (a < 0)) * mask).sum() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_micro_batch_shares_add_up(loss_type):
    """Global denominators: any split of the step (with filler rows) gives the same loss and gradient."""
    new, old, ref, mask, rewards, index = random_rollout(1, groups=3)
    plugin = loss("grpo", beta=0.04, loss_type=loss_type, max_completion_length=6)
    adv = plugin.compute_advantages(RolloutBatch(rewards, index))
    step = StepCounts(examples=float(new.shape[0]), tokens=float(mask.sum()))
    full, g_full = grad_of(lambda lp: step_loss(plugin, inputs_for(lp, mask, adv, old, ref), step).loss, new)

    def split(lp):
        total = 0
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]):
            rows = torch.tensor(rows)
            filler = 2  # rows that only fill the micro-batch must add nothing
            pick = torch.cat([rows, rows[:filler]])
            weight = torch.cat([torch.ones(len(rows), dtype=DT), torch.zeros(filler, dtype=DT)])
            total = total + step_loss(plugin, inputs_for(lp[pick], mask[pick], adv[pick], old[pick], ref[pick],
                                                         weight=weight), step).loss
        return total

    parts, g_parts = grad_of(split, new)
    close(parts, full)
    close(g_parts, g_full)


def test_on_policy_ratio_is_one_and_never_clips():
    new, _, ref, mask, rewards, index = random_rollout(2)
    plugin = loss("grpo", beta=0.0, loss_type="grpo", epsilon=0.01, epsilon_high=0.01)
    adv = plugin.compute_advantages(RolloutBatch(rewards, index))
    lp = new.clone().requires_grad_(True)
    out_none = step_loss(plugin, inputs_for(lp, mask, adv, old=None))
    out_same = step_loss(plugin, inputs_for(lp, mask, adv, old=lp.detach()))
    assert torch.equal(torch.exp(lp - lp.detach()), torch.ones_like(lp))  # exactly 1
    for out in (out_none, out_same):
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert torch.all(out.metrics[name] == 0), name
    n = mask.sum(-1)
    close(out_none.loss, -(adv * (mask.sum(-1) / n)).sum() / len(adv))  # value = -mean(A) with rho = 1
    (g_none,) = torch.autograd.grad(out_none.loss, lp)
    (g_same,) = torch.autograd.grad(out_same.loss, lp)
    close(g_none, g_same)
    close(g_none, -(adv[:, None] * mask / n[:, None]) / len(adv))  # REINFORCE with the group baseline


# ----------------------------------------------------------------------------------------------------
# advantage estimators (posttrain.losses.ADVANTAGE_ESTIMATORS)
# ----------------------------------------------------------------------------------------------------

def test_leave_one_out_estimator_by_hand_and_group_mean_std_is_trls():
    assert set(ADVANTAGE_ESTIMATORS) == {"group_mean", "group_mean_std", "batch_std", "leave_one_out",
                                         "reinforce_pp", "none"}
    # groups need not be contiguous: group 0 = rows 0, 2, 4, 6; group 1 = rows 1, 3; group 2 = row 5 alone
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.7, 0.25], dtype=DT)
    index = torch.tensor([0, 1, 0, 1, 0, 2, 0])
    loo = ADVANTAGE_ESTIMATORS.get("leave_one_out")()(RolloutBatch(rewards, index))
    # A_i = r_i - mean of the other rewards of i's group, by hand:
    #   group 0 (1, 0, 0.5, 0.25): 1 - 0.75/3, 0 - 1.75/3, 0.5 - 1.25/3, 0.25 - 1.5/3
    #   group 1 (1, 0): 1 - 0, 0 - 1;  group 2 (one completion): 0
    expected = [3 / 4, 1.0, -7 / 12, -1.0, 1 / 12, 0.0, -1 / 4]
    close(loo, expected)
    assert loo[5] == 0  # a group of one has no baseline: advantage exactly 0
    # RLOO = G / (G - 1) * (r - group mean) for groups of G > 1
    centred = group_normalised_advantages(rewards, index, "none")
    close(loo[[0, 2, 4, 6]], centred[[0, 2, 4, 6]] * 4 / 3)
    close(loo[[1, 3]], centred[[1, 3]] * 2)
    single = ADVANTAGE_ESTIMATORS.get("leave_one_out")()(RolloutBatch(torch.tensor([0.9], dtype=DT),
                                                                      torch.tensor([7])))
    assert single.tolist() == [0.0]
    # REINFORCE++: one baseline for the whole batch, r - mean(r), over its Bessel-corrected std (+ 1e-4)
    mean, std = rewards.mean(), rewards.std(correction=1)
    close(ADVANTAGE_ESTIMATORS.get("reinforce_pp")()(RolloutBatch(rewards, index)), (rewards - mean) / (std + 1e-4))
    assert float(rewards.sum() / 7) == pytest.approx(float(mean)) and float(std) == pytest.approx(
        (sum((float(r) - float(mean)) ** 2 for r in rewards) / 6) ** 0.5)
    # group_mean_std is TRL's group normalisation (and GRPO's default estimator), also on the spec example
    for r, g in ((rewards, index), (SPEC_REWARDS, ONE_GROUP)):
        batch = RolloutBatch(r, g)
        close(ADVANTAGE_ESTIMATORS.get("group_mean_std")()(batch), group_normalised_advantages(r, g, "group"))
        close(ADVANTAGE_ESTIMATORS.get("batch_std")()(batch), group_normalised_advantages(r, g, "batch"))
        close(ADVANTAGE_ESTIMATORS.get("group_mean")()(batch), group_normalised_advantages(r, g, "none"))
        close(ADVANTAGE_ESTIMATORS.get("none")()(batch), r)
        close(loss("grpo").compute_advantages(batch), group_normalised_advantages(r, g, "group"))
    # GRPO picks its estimator from scale_rewards; the recipe's rollout.advantage_estimator may replace it
    for scale, name in (("group", "group_mean_std"), ("batch", "batch_std"), ("none", "group_mean")):
        assert loss("grpo", scale_rewards=scale).estimator.name == name
    plugin = loss("grpo")
    plugin.use_estimator("leave_one_out")
    close(plugin.compute_advantages(RolloutBatch(rewards, index)), expected)


# ----------------------------------------------------------------------------------------------------
# the unified core: backward_through_coefficients gives autograd of the step loss, for every group loss
# ----------------------------------------------------------------------------------------------------

def _core_case(name: str):
    """(plugin, inputs builder lp -> GroupLossInputs, step counts) on an off-policy rollout with clipping
    active, a filler row (weight 0) and step counts larger than the micro-batch (another micro-batch exists)."""
    new, old, ref, mask, rewards, index = random_rollout(6, groups=3)
    n = new.shape[0]
    weight = torch.ones(n, dtype=DT)
    weight[-1] = 0.0
    counts = StepCounts(examples=float(weight.sum()) + 5.0, tokens=float((mask * weight[:, None]).sum()) + 17.0)
    gen = torch.Generator().manual_seed(7)
    extra = {}
    if name.startswith(("grpo", "gspo")):
        loss_name, loss_type = name.split(":")[:2]
        params = {"beta": 0.04, "loss_type": loss_type, "epsilon_high": 1.05 if loss_type == "cispo" else 0.28}
        if loss_type == "dr_grpo":
            params["max_completion_length"] = 7
        if name.endswith(":sequence"):
            params["importance_sampling_level"] = "sequence"
        plugin = loss(loss_name, **params)
        adv = plugin.compute_advantages(RolloutBatch(rewards, index))
    elif name == "hpt":
        plugin = loss("hpt", max_completion_length=7, sft_coef=0.5)
        adv = plugin.compute_advantages(RolloutBatch(rewards, index, mask=mask, extras={"demonstration": index == 0}))
        assert (adv[:, 1] == 1).any() and (adv[:, 1] == 0).any()  # both terms present
    elif name == "online_dpo":
        plugin = loss("online_dpo", pairing="all_pairs", pair_params={"beta": 0.5})
        adv = plugin.compute_advantages(RolloutBatch(rewards, index))
        extra.update(group_index=index, rewards=rewards)
    elif name == "gmpo":
        plugin = loss("gmpo", beta=0.04, epsilon=0.2, epsilon_high=0.3)
        adv = plugin.compute_advantages(RolloutBatch(rewards, index))
    elif name == "gtpo":
        plugin = loss("gtpo")
        ids = torch.randint(3, 5, new.shape, generator=gen)
        entropy = 0.5 * torch.rand(new.shape, generator=gen, dtype=DT)
        adv = plugin.compute_advantages(RolloutBatch(rewards, index, mask=mask, token_ids=ids, entropy=entropy))
        assert (adv != 0).any()
        extra["group_index"] = index
    else:
        plugin = loss("copo")
        answers = [str(int(x)) for x in torch.randint(0, 3, (n,), generator=gen)]
        adv = plugin.compute_advantages(RolloutBatch(rewards, index, answers=answers))
        old = old.clone()
        old[:, 0] = new[:, 0] - 1.5  # ratio e^1.5: clipped high where A > 0, dual-clipped (> c = 3) where A < 0
        old[:, 1] = (new[:, 1] + 1.0) * mask[:, 1]  # ratio e^-1: clipped low where A < 0
        assert ((adv[:, 1] < 0) & (weight > 0)).any() and ((adv[:, 1] > 0) & (weight > 0)).any()

    def build(lp):
        return GroupLossInputs(logps=lp, mask=mask, advantages=adv, completion_weight=weight, old_logps=old,
                               ref_logps=ref if plugin.needs_reference else None, **extra)

    return plugin, build, counts, new


CORE_CASES = ["grpo:grpo", "grpo:dapo", "grpo:dr_grpo", "grpo:grpo:sequence", "grpo:cispo", "grpo:sapo",
              "gspo:grpo", "gmpo", "gtpo", "copo", "online_dpo", "hpt"]


def test_core_cases_cover_every_registered_group_loss():
    from posttrain.losses import LOSSES

    builtin = {name for name, cls in LOSSES.items()
               if cls.data_kind == "groups" and cls.__module__.startswith("posttrain.")}
    assert builtin == {case.split(":")[0] for case in CORE_CASES}


@pytest.mark.parametrize("case", CORE_CASES)
def test_backward_through_coefficients_equals_autograd_of_step_loss(case):
    """The trainer's gradient path: step_loss on a detached copy, c = -dL/dlp by autograd, then the surrogate
    -sum c lp backpropagated into the "model output" (a float64 leaf). Its gradient equals autograd of
    step_loss directly, to 1e-9; the returned loss is the step loss and the coefficients are -dL/dlp."""
    plugin, build, counts, new = _core_case(case)
    value, g_auto = grad_of(lambda lp: plugin.step_loss(build(lp), counts).loss, new)
    model_output = new.detach().clone().requires_grad_(True)
    calls = []

    def backward(surrogate):
        calls.append(surrogate)
        surrogate.backward()

    out, coefficients = backward_through_coefficients(lambda leaves: plugin.step_loss(build(leaves["logps"]), counts),
                                                      {"logps": model_output}, backward)
    assert len(calls) == 1 and out.direct is None and not out.loss.requires_grad
    close(out.loss, value)
    close(model_output.grad, g_auto)
    close(coefficients["logps"], -g_auto)
    assert g_auto.abs().max() > 1e-3  # a real gradient
    if case.startswith("grpo"):  # clipping is active on both sides
        metrics = out.metrics
        assert metrics["clip_ratio/low_mean"].sum() > 0 and metrics["clip_ratio/high_mean"].sum() > 0
    if case == "copo":  # dual-clipped tokens (A_glob < 0, ratio > 3) get no gradient
        dual = (build(new).advantages[:, 1] < 0) & (build(new).completion_weight > 0)
        assert dual.any() and g_auto[dual, 0].abs().max() == 0
    assert g_auto[-1].abs().max() == 0  # the filler row gets none
    for name, metric in plugin.step_loss(build(new), counts).metrics.items():
        close(out.metrics[name], metric)


def test_group_log_ratio_is_clamped_before_exp():
    """|log pi_theta - log pi_old| is clamped to 20 before exp: a far-off-policy token gives a finite loss."""
    lp = torch.tensor([[-0.5, -30.0, -0.1]], dtype=DT)
    old = torch.tensor([[-60.0, -0.5, -0.1]], dtype=DT)
    mask = torch.ones(1, 3, dtype=DT)
    inputs = inputs_for(lp, mask, torch.ones(1, dtype=DT), old=old)
    close(inputs.log_ratio(), [[20.0, -20.0, 0.0]])
    for name in ("grpo", "gtpo"):
        plugin = loss(name)
        out = step_loss(plugin, inputs_for(lp, mask, torch.ones(1, dtype=DT), old=old, group_index=torch.zeros(1)))
        assert torch.isfinite(out.loss), name


def test_grpo_params_and_registration():
    plugin = loss("grpo")
    assert plugin.data_kind == "groups" and not plugin.needs_reference and plugin.params.loss_type == "dapo"
    assert plugin.level == "token" and loss("grpo", loss_type="grpo").level == "sequence"
    assert loss("grpo", beta=0.04).needs_reference
    with pytest.raises(RecipeError, match="max_completion_length"):
        loss("grpo", loss_type="dr_grpo")
    with pytest.raises(RecipeError, match="not one of"):
        loss("grpo", scale_rewards="std")
    with pytest.raises(ValueError, match="ref_logps"):
        p = loss("grpo", beta=0.1)
        step_loss(p, inputs_for(SPEC_NEW.clone().requires_grad_(), SPEC_MASK, torch.zeros(4, dtype=DT)))


# ----------------------------------------------------------------------------------------------------
# GRPO vs TRL 1.16 GRPOTrainer._compute_loss
# ----------------------------------------------------------------------------------------------------

_TRAINERS: dict = {}


@pytest.fixture
def trl_grpo(tokenizer, tmp_path_factory):
    """A real TRL GRPOTrainer on a tiny float64 Llama, built once per loss type. It is built with beta = 0
    (with beta > 0 TRL would load a reference model by name); beta and the knobs below are set on the
    instance afterwards: `_compute_loss` reads them as attributes at call time."""
    pytest.importorskip("trl", minversion="1.16")

    def get(loss_type: str):
        if loss_type in _TRAINERS:
            return _TRAINERS[loss_type]
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from conftest import make_tiny_model

        args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl-grpo")), loss_type=loss_type, beta=0.0,
                          num_generations=4, per_device_train_batch_size=4, max_completion_length=7,
                          report_to="none", use_cpu=True, bf16=False, fp16=False, save_strategy="no",
                          logging_strategy="no", use_bias_correction_kl=False, seed=0)
        trainer = GRPOTrainer(model=make_tiny_model(len(tokenizer), dtype=DT),
                              reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop
        _TRAINERS[loss_type] = trainer
        return trainer

    return get


def trl_loss(trainer, lp, old, ref, mask, adv, beta, epsilon_high, bias=False, level="token"):
    n, width = lp.shape
    trainer.beta = beta
    trainer.epsilon_high = epsilon_high
    trainer.importance_sampling_level = level
    trainer.args.use_bias_correction_kl = bias
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones(n, width, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_grpo_equals_trl(trl_grpo, loss_type):
    trainer = trl_grpo(loss_type)
    assert trainer.loss_type == loss_type and trainer.epsilon_low == 0.2
    assert trainer.max_completion_length == 7 and trainer.accelerator.num_processes == 1
    new, old, ref, mask, rewards, index = random_rollout(3)
    settings = [(0.04, 0.2, False, "token"), (0.0, 0.28, False, "token"), (0.04, 0.28, True, "token"),
                (0.04, 0.2, True, "sequence")]
    if loss_type == "cispo":  # its epsilon_high caps the ratio itself (MiniMax-M1 uses values above 1)
        settings = [(0.04, 1.05, False, "token"), (0.0, 0.9, False, "token"), (0.04, 1.02, True, "token")]
    temperatures = [(1.0, 1.05)] * len(settings)
    if loss_type == "sapo":  # TRL's torch.where makes the temperatures float32: values exact in float32 compare exactly
        temperatures = [(1.0, 1.25), (0.5, 2.0), (2.0, 0.5), (1.0, 1.25)]
    for (beta, eps_high, bias, level), (t_pos, t_neg) in zip(settings, temperatures):
        trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = t_pos, t_neg
        plugin = loss("grpo", beta=beta, loss_type=loss_type, epsilon_high=eps_high, use_bias_correction_kl=bias,
                      importance_sampling_level=level, max_completion_length=7, sapo_temperature_pos=t_pos,
                      sapo_temperature_neg=t_neg)
        adv = plugin.compute_advantages(RolloutBatch(rewards, index))
        ours, g_ours = grad_of(lambda lp: step_loss(plugin, inputs_for(lp, mask, adv, old, ref)).loss, new)
        theirs, g_theirs = grad_of(lambda lp: trl_loss(trainer, lp, old, ref, mask, adv, beta, eps_high, bias, level),
                                   new)
        close(ours, theirs)
        close(g_ours, g_theirs)


# ----------------------------------------------------------------------------------------------------
# GTPO: spec section 7 worked example
# ----------------------------------------------------------------------------------------------------

GTPO_IDS = torch.tensor([[5, 7, 9, 3, 2], [5, 7, 8, 3, 2], [5, 6, 9, 3, 2], [5, 7, 9, 4, 2]])
GTPO_REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=DT)
GTPO_ENTROPY = torch.tensor([0.30, 0.50, 0.90, 0.20], dtype=DT)[:, None].expand(4, 5).clone()
GTPO_MASK = torch.ones(4, 5, dtype=DT)


def gtpo_batch(**kw):
    return RolloutBatch(GTPO_REWARDS, ONE_GROUP, mask=GTPO_MASK, token_ids=GTPO_IDS, entropy=GTPO_ENTROPY, **kw)


def test_gtpo_conflict_runs_spec():
    lam, n_conf, fwd, bwd = conflict_weights(GTPO_IDS, GTPO_MASK, GTPO_REWARDS - 0.5, ONE_GROUP)
    assert fwd.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert bwd.int().tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert lam.tolist() == [[4] * 5, [0, 0, 1, 0, 0], [2, 1, 2, 2, 2], [0, 0, 0, 1, 0]]
    assert n_conf.tolist() == [5, 4, 4, 4]
    close(loss("gtpo").shaped_advantages(gtpo_batch()), [0.47, -0.55, 0.0, -0.52])


def test_gtpo_conflicts_with_padding_and_neutral_rows():
    """Right padding: the suffix run is end-aligned per row; an A = 0 completion keeps lambda 1."""
    ids = torch.tensor([[5, 7, 2, 0], [5, 8, 7, 2], [5, 7, 2, 0], [6, 6, 6, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=DT)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=DT)
    lam, n_conf, fwd, bwd = conflict_weights(ids, mask, adv, ONE_GROUP)
    assert fwd.int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0] * 4, [0] * 4]
    assert bwd.int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 1], [0] * 4, [0] * 4]  # "7 2" shared at the end
    assert lam.tolist() == [[2, 2, 2, 0], [0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert n_conf.tolist() == [3, 3, 1, 1]


@pytest.mark.parametrize("params,expected", [
    ({}, -0.3225),  # the authors' code: sum over the group, / n_conf (default)
    ({"reduction": "mean"}, -0.080625),  # 1/G with / n_conf
    ({"reduction": "mean", "divide_by_n_conflict": False}, -0.4165),  # README-style mean without / n_conf
])
def test_gtpo_spec_values(params, expected):
    plugin = loss("gtpo", **params)
    assert not plugin.needs_reference and plugin.data_kind == "groups"
    adv = plugin.compute_advantages(gtpo_batch())
    lp = -torch.rand(4, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    out = step_loss(plugin, inputs_for(lp.requires_grad_(), GTPO_MASK, adv, group_index=ONE_GROUP))
    close(out.loss, expected)
    per_completion = [-0.376, 0.0275, 0.0, 0.026] if params.get("divide_by_n_conflict", True) else \
        [-1.88, 0.11, 0.0, 0.104]
    close(out.metrics["gtpo/completion_loss"], per_completion)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gtpo_gradient_equals_autograd_of_code_formula(reduction):
    """Two groups of different size, padding, off-policy rows: the core gradient equals autograd of
    sum_i c_i * (-(sum_t m A'_i lambda_it / n_conf_i * rho_t) / |o_i|)."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 6, (7, 5), generator=gen)
    mask = torch.ones(7, 5, dtype=DT)
    mask[2, 3:] = 0
    mask[5, 4:] = 0
    rewards = torch.tensor([1, 0, 1, 0, 1, 1, 0], dtype=DT)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    entropy = torch.rand(7, 5, generator=gen, dtype=DT)
    plugin = loss("gtpo", reduction=reduction)
    adv = plugin.compute_advantages(RolloutBatch(rewards, index, mask=mask, token_ids=ids, entropy=entropy))
    new = -torch.rand(7, 5, generator=gen, dtype=DT)
    old = new + 0.3 * torch.randn(7, 5, generator=gen, dtype=DT)
    sizes = torch.tensor([4, 4, 4, 4, 3, 3, 3], dtype=DT) if reduction == "sum" else torch.ones(7, dtype=DT)

    def code(lp):
        per = -(mask * adv * torch.exp(lp - old)).sum(-1) / mask.sum(-1)
        return (sizes * per).sum() / 7

    ours, g_ours = grad_of(lambda lp: step_loss(plugin, inputs_for(lp, mask, adv, old, group_index=index)).loss, new)
    ref, g_ref = grad_of(code, new)
    close(ours, ref)
    close(g_ours, g_ref)


def test_gtpo_needs_entropy_and_ids():
    with pytest.raises(ValueError, match="entropy"):
        loss("gtpo").compute_advantages(RolloutBatch(GTPO_REWARDS, ONE_GROUP, mask=GTPO_MASK, token_ids=GTPO_IDS))
    with pytest.raises(ValueError, match="token_ids"):
        loss("gtpo").compute_advantages(RolloutBatch(GTPO_REWARDS, ONE_GROUP, mask=GTPO_MASK, entropy=GTPO_ENTROPY))


# ----------------------------------------------------------------------------------------------------
# COPO: spec section 8 worked example
# ----------------------------------------------------------------------------------------------------

COPO_REWARDS = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=DT)
COPO_INDEX = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
COPO_ANSWERS = ["5", "5", "5", "5", "3", "4", "4", "7"]


def test_copo_spec_intermediates():
    stats = loss("copo").group_statistics(RolloutBatch(COPO_REWARDS, COPO_INDEX, answers=COPO_ANSWERS))
    close(stats["entropy"], [0.0] * 4 + [1.5] * 4)
    close(stats["local"][4:], [1.499997, -0.499999, -0.499999, -0.499999], rtol=1e-6)
    close(stats["local"][:4], [0.0] * 4)
    close(stats["global_reward"], [1.0] * 4 + [0.25] * 4)
    close(stats["global"], [0.7071054478557284] * 4 + [-0.7071054478557284] * 4)
    close(stats["w"], [1 / (1 + math.exp(5))] * 4 + [1 / (1 + math.exp(-2.5))] * 4)
    close(stats["local_weight"][4:], [0.9241418199787566, 0, 0, 0])
    coef = loss("copo", reward_coef_flg=True).group_statistics(
        RolloutBatch(COPO_REWARDS, COPO_INDEX, answers=COPO_ANSWERS))
    close(coef["global_reward"][4], 0.109375)  # lambda_4 = 0.375


def test_copo_spec_value():
    plugin = loss("copo")
    assert not plugin.needs_reference and plugin.params.k == 5 and plugin.params.b == 1
    adv = plugin.compute_advantages(RolloutBatch(COPO_REWARDS, COPO_INDEX, answers=COPO_ANSWERS))
    mask = torch.ones(8, 3, dtype=DT)
    mask[5, 2:] = 0
    lp = -torch.rand(8, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    out = step_loss(plugin, inputs_for(lp.requires_grad_(), mask, adv))  # on-policy: token loss = -A
    close(out.loss, -0.25259318345568926)
    close(out.metrics["copo/completion_loss"], [-0.702373] * 4 + [-1.332570, 0.707105, 0.707105, 0.707105],
          rtol=1e-6)


def test_copo_needs_two_prompts_and_answers():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        loss("copo").compute_advantages(RolloutBatch(COPO_REWARDS[:4], COPO_INDEX[:4], answers=COPO_ANSWERS[:4]))
    with pytest.raises(ValueError, match="answers"):
        loss("copo").compute_advantages(RolloutBatch(COPO_REWARDS, COPO_INDEX))
    with pytest.raises(RecipeError, match="not one of"):
        loss("copo", global_flg="soft with zero")


def copo_verl_loss(lp, old, mask, a_loc, a_glob, w, eps=0.2, c=3.0):
    """verl's compute_policy_loss_with_global (dual clip) + seq-mean-token-mean, written out."""
    ratio = torch.exp(lp - old)

    def pg(adv):
        l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
        clip1 = torch.maximum(l1, l2)
        return torch.where(adv < 0, torch.min(-adv * c, clip1), clip1)

    policy = pg(a_glob) * (1 - w) + pg(a_loc) * w
    return ((policy * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.parametrize("flag", ["soft-with-zero", "only-soft", "soft-with-forced", "only-zero", "only-global",
                                  "no-global"])
def test_copo_gradient_equals_autograd_of_verl_formula(flag):
    gen = torch.Generator().manual_seed(5)
    rewards = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1], dtype=DT)
    index = torch.arange(12) // 4
    answers = ["5", "5", "5", "5", "3", "4", "4", "7", "2", "2", "9", "2"]
    plugin = loss("copo", global_flg=flag)
    adv = plugin.compute_advantages(RolloutBatch(rewards, index, answers=answers))
    mask = torch.ones(12, 6, dtype=DT)
    mask[3, 4:] = 0
    mask[7, 2:] = 0
    new = -torch.rand(12, 6, generator=gen, dtype=DT)
    old = new + 0.7 * torch.randn(12, 6, generator=gen, dtype=DT)
    old[5:8, 0] = new[5:8, 0] - 1.5  # ratio e^1.5 > c = 3 with A < 0: the dual clip is active
    ours, g_ours = grad_of(lambda lp: step_loss(plugin, inputs_for(lp, mask, adv, old)).loss, new)
    a_loc, a_glob, w = adv[:, :1], adv[:, 1:2], adv[:, 2:3]
    ref, g_ref = grad_of(lambda lp: copo_verl_loss(lp, old, mask, a_loc, a_glob, w), new)
    close(ours, ref)
    close(g_ours, g_ref)
    assert (adv[5:8, :2] < 0).all() and g_ours[5:8, 0].abs().max() == 0  # dual-clipped: no gradient


def test_gspo_is_grpo_with_sequence_ratios_and_the_papers_clip_range():
    gspo = loss("gspo")
    assert (gspo.params.importance_sampling_level, gspo.params.epsilon, gspo.params.epsilon_high,
            gspo.params.loss_type, gspo.params.beta) == ("sequence", 3e-4, 4e-4, "grpo", 0.0)
    as_grpo = loss("grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, loss_type="grpo")
    new, old, ref, mask, rewards, index = random_rollout(3)
    adv = gspo.compute_advantages(RolloutBatch(rewards, index))
    a = step_loss(gspo, inputs_for(new, mask, adv, old, ref)).loss
    b = step_loss(as_grpo, inputs_for(new, mask, adv, old, ref)).loss
    assert a.item() == b.item() and a.item() != 0


def test_cispo_keeps_a_gradient_on_tokens_ppo_would_clip():
    """CISPO's weight is the clipped, detached ratio: a token with rho far above 1 + eps (A > 0) still gets
    gradient -min(rho, eps_high) A / tokens, where PPO's clipped surrogate gives 0."""
    lp = torch.tensor([[-1.0, -2.0]], dtype=DT)
    old = torch.tensor([[-3.0, -2.0]], dtype=DT)  # token 0: rho = e^2
    mask, adv = torch.ones(1, 2, dtype=DT), torch.tensor([1.0], dtype=DT)
    cispo, ppo = loss("grpo", loss_type="cispo", epsilon_high=5.0), loss("grpo", loss_type="dapo", epsilon_high=0.28)
    _, g_cispo = grad_of(lambda x: step_loss(cispo, inputs_for(x, mask, adv, old, None)).loss, lp)
    _, g_ppo = grad_of(lambda x: step_loss(ppo, inputs_for(x, mask, adv, old, None)).loss, lp)
    close(g_cispo, torch.tensor([[-5.0 / 2, -1.0 / 2]], dtype=DT))  # min(e^2, 5) = 5 on token 0, rho = 1 on token 1
    assert g_ppo[0, 0] == 0 and g_ppo[0, 1] == pytest.approx(-0.5)


@pytest.mark.parametrize("beta, eps, eps_high", [(0.0, 0.4, None), (0.04, 0.2, 0.3), (0.04, 0.05, 0.1)])
def test_gmpo_equals_trl_gmpo_trainer(tokenizer, tmp_path, beta, eps, eps_high):
    """TRL 1.16's experimental GMPOTrainer._compute_loss on the same per-token log-probs, float64, one micro-batch."""
    pytest.importorskip("trl", minversion="1.16")
    from datasets import Dataset
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    from conftest import make_tiny_model

    args = GMPOConfig(output_dir=str(tmp_path / "gmpo"), beta=0.0, epsilon=eps, epsilon_high=eps_high,
                      num_generations=4, per_device_train_batch_size=4, max_completion_length=7, report_to="none",
                      use_cpu=True, bf16=False, fp16=False, save_strategy="no", logging_strategy="no", seed=0)
    trainer = GMPOTrainer(model=make_tiny_model(len(tokenizer), dtype=DT),
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.beta = beta  # set after construction: with beta > 0 TRL would load a reference model by name
    new, old, ref, mask, rewards, index = random_rollout(3)
    plugin = loss("gmpo", beta=beta, epsilon=eps, epsilon_high=eps_high)
    adv = plugin.compute_advantages(RolloutBatch(rewards, index))
    ours, g_ours = grad_of(lambda lp: step_loss(plugin, inputs_for(lp, mask, adv, old, ref)).loss, new)

    def theirs(lp):
        n, width = lp.shape
        trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
        inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
                  "completion_ids": torch.ones(n, width, dtype=torch.long), "completion_mask": mask.long(),
                  "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
        return trainer._compute_loss(trainer.model, inputs)

    value, g_theirs = grad_of(theirs, new)
    close(ours, value)
    close(g_ours, g_theirs)
    assert (g_ours != 0).any()
