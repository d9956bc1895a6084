"""SimPO, RPO, rDPO and the SFT reductions (spec sections 2, 3, 4, 10), in float64.

1. Each loss equals the spec's worked example (Appendix B numbers, or their closed forms) to rtol 1e-9.
2. The gradient each plug-in sends through the unified core (`backward_through_coefficients`: c = -dL/dlp on
   detached log-probs, then -sum c lp backpropagated, as the trainer does) equals autograd of the paper formula
   (written out independently below) on random per-token inputs with masks of different lengths and a
   zero-weight filler row; splitting the step into micro-batches changes neither the loss nor the gradient.
   For every registered pair loss (and a user's plain LossPlugin), the parameter gradient of a tiny float64
   model through the coefficients equals autograd of the plug-in's step loss on the live log-probs.
3. Equality with TRL 1.16 on identical inputs, one micro-batch, one process:
   - rDPO vs a real `DPOTrainer(loss_type="robust", label_smoothing=eps)`;
   - RPO (reduction token_mean_batch) vs a real `DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1, alpha])`;
     per-token log-probs are injected into TRL through a forward hook as in tests/test_dpo_trl_parity.py;
   - SimPO vs a real `trl.experimental.cpo.CPOTrainer(loss_type="simpo", simpo_gamma=beta*ratio)`: TRL computes
     its own average log-probs from the float64 logits, so the comparison is of the loss, the metrics and the
     gradient w.r.t. every model parameter (with `cpo_alpha` = SimPO's `sft_weight`).
4. Reference-free SimPO never runs a reference pass in `posttrain.trainer.Trainer` (DPO does: the count can fail);
   reference passes are counted at `posttrain.models.Reference.log_probs`.
5. Each of simpo, rpo and rdpo trains the tiny task (held-out ranking accuracy rises by a stated margin).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from helpers import recipe_from, tiny_recipe
from posttrain.config import LossTerm
from posttrain.core import PolicyLogProbs, StepCounts, backward_through_coefficients
from posttrain.errors import RecipeError
from posttrain.losses import LOSSES, LossOutput, LossPlugin, PairLossInputs, build_loss, sequence_sums
from posttrain.models import Reference
from posttrain.trainer import Trainer

RTOL = 1e-9
F64 = torch.float64


def _loss(name: str, **params):
    return build_loss([LossTerm(name=name, weight=1.0, params=params)])


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _inputs(chosen, rejected, chosen_mask=None, rejected_mask=None, ref_chosen=None, ref_rejected=None,
            pair_weight=None) -> PairLossInputs:
    chosen_mask = torch.ones_like(chosen) if chosen_mask is None else chosen_mask
    rejected_mask = torch.ones_like(rejected) if rejected_mask is None else rejected_mask
    pair_weight = torch.ones(chosen.shape[0], dtype=F64) if pair_weight is None else pair_weight
    return PairLossInputs(chosen_logps=chosen, rejected_logps=rejected, chosen_mask=chosen_mask,
                          rejected_mask=rejected_mask, pair_weight=pair_weight,
                          ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)


def _counts(inputs: PairLossInputs) -> StepCounts:
    """The step's counts when the step is these inputs alone: real pairs, and their chosen tokens."""
    real = inputs.pair_weight[:, None]
    return StepCounts(examples=float(inputs.pair_weight.sum()), tokens=float((inputs.chosen_mask * real).sum()))


def _step(plugin, inputs: PairLossInputs, counts: StepCounts | None = None):
    """The plug-in's step loss (globally normalised: the value the trainer logs)."""
    return plugin.step_loss(inputs, _counts(inputs) if counts is None else counts)


def _through_coefficients(plugin, inputs: PairLossInputs, counts: StepCounts | None = None):
    """The trainer's gradient path on `inputs.chosen_logps` / `inputs.rejected_logps` (leaves or a model's graph):
    c = -dL/dlp on detached copies, then `-sum c lp` backpropagated. Returns (detached StepLoss, coefficients)."""
    counts = _counts(inputs) if counts is None else counts
    return backward_through_coefficients(lambda leaves: plugin.step_loss(replace(inputs, **leaves), counts),
                                         {"chosen_logps": inputs.chosen_logps, "rejected_logps": inputs.rejected_logps},
                                         lambda surrogate: surrogate.backward())


def _close(actual: float, expected: float, rtol: float = RTOL):
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=0.0), (actual, expected)


def softplus(x: float) -> float:  # -logsigmoid(-x), exact in double precision for the arguments used here
    return math.log1p(math.exp(x)) if x < 0 else x + math.log1p(math.exp(-x))


# ====================================================================================== 1. worked examples
# Spec section 2: chosen tokens [-1, -2, -0.5, -0.5] (A = -1), rejected [-2, -1, -3] (A = -2; padded to 4).
SIMPO_CHOSEN = _t([[-1.0, -2.0, -0.5, -0.5]])
SIMPO_REJECTED = _t([[-2.0, -1.0, -3.0, 0.0]])
SIMPO_REJECTED_MASK = _t([[1.0, 1.0, 1.0, 0.0]])


def _simpo_worked():
    return _inputs(SIMPO_CHOSEN.clone(), SIMPO_REJECTED.clone(), rejected_mask=SIMPO_REJECTED_MASK.clone())


@pytest.mark.parametrize("beta, ratio, z, spec_value, spec_abs", [
    (2.0, 0.5, 1.0, 0.3132616875, 1e-10),
    (2.5, 0.55, 1.125, 0.281150, 5e-7),
    (10.0, 0.3, 7.0, 0.000911, 5e-7),
])
def test_simpo_worked_example(beta, ratio, z, spec_value, spec_abs):
    exact = softplus(-z)  # -logsigmoid(z), z = beta (A_w - A_l) - beta ratio
    assert abs(exact - spec_value) <= spec_abs  # the closed form is the spec's table row
    out = _step(_loss("simpo", beta=beta, gamma_beta_ratio=ratio), _simpo_worked())
    assert out.loss.dtype == F64
    _close(out.loss.item(), exact)
    # Logged rewards are beta * A(y), gamma excluded; logps are the averages (length-normalised).
    _close(out.metrics["rewards/chosen"].item(), -beta)
    _close(out.metrics["rewards/rejected"].item(), -2 * beta)
    _close(out.metrics["rewards/margins"].item(), beta)
    _close(out.metrics["logps/chosen"].item(), -1.0)
    _close(out.metrics["logps/rejected"].item(), -2.0)
    assert out.metrics["rewards/accuracies"].item() == 1.0
    # The absolute `gamma` (the paper's margin) is equivalent to gamma_beta_ratio and overrides it.
    absolute = _step(_loss("simpo", beta=beta, gamma=beta * ratio, gamma_beta_ratio=0.9), _simpo_worked())
    _close(absolute.loss.item(), exact)


def test_simpo_worked_example_with_sft_weight():
    out = _step(_loss("simpo", beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0), _simpo_worked())
    _close(out.loss.item(), 1.3132616875182228)  # Appendix B: 0.3132617 + 1.0 (mean NLL of the chosen tokens)
    _close(out.parts["loss/sft"].item(), 1.0)
    # sft_weight scales the SFT term only.
    half = _step(_loss("simpo", beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.5), _simpo_worked())
    _close(half.loss.item(), softplus(-1.0) + 0.5)


def test_simpo_worked_example_is_trl_cpo_loss():
    """TRL's own `CPOTrainer.cpo_loss` (loss_type="simpo", absolute simpo_gamma) on the spec's averages."""
    pytest.importorskip("trl", minversion="1.16")
    from trl.experimental.cpo import CPOTrainer

    for beta, ratio in [(2.0, 0.5), (2.5, 0.55), (10.0, 0.3)]:
        fake = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=beta * ratio, label_smoothing=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, _t([-1.0]), _t([-2.0]))
        out = _step(_loss("simpo", beta=beta, gamma_beta_ratio=ratio), _simpo_worked())
        _close(out.loss.item(), losses.mean().item())
        _close(out.metrics["rewards/chosen"].item(), chosen_rewards.item())
        _close(out.metrics["rewards/rejected"].item(), rejected_rewards.item())


# Spec section 1 (DPO) inputs, used by RPO and rDPO: S_w = -10, S_l = -12, S_ref,w = -11, S_ref,l = -11.5, h = 1.5.
DPO_WORKED = dict(chosen=[-2.0, -3.0, -5.0], rejected=[-4.0, -4.0, -4.0], ref_chosen=[-2.5, -3.5, -5.0],
                  ref_rejected=[-4.0, -3.5, -4.0])
L_DPO = 0.6209570477895321  # Appendix B; = softplus(-0.15)


def _dpo_worked(requires_grad=False):
    t = {k: _t([v]) for k, v in DPO_WORKED.items()}
    chosen, rejected = t["chosen"].requires_grad_(requires_grad), t["rejected"].requires_grad_(requires_grad)
    return _inputs(chosen, rejected, ref_chosen=t["ref_chosen"], ref_rejected=t["ref_rejected"])


def _rpo_two_pair_batch():
    """Spec section 3: the worked DPO pair plus pair 2 (chosen [-1,-1], h2 = 0.3); pair 2 has 2 tokens of 3."""
    pad = 0.0
    return _inputs(_t([[-2.0, -3.0, -5.0], [-1.0, -1.0, pad]]), _t([[-4.0, -4.0, -4.0], [-1.5, -0.5, pad]]),
                   chosen_mask=_t([[1, 1, 1], [1, 1, 0]]), rejected_mask=_t([[1, 1, 1], [1, 1, 0]]),
                   ref_chosen=_t([[-2.5, -3.5, -5.0], [-1.2, -1.1, pad]]),
                   ref_rejected=_t([[-4.0, -3.5, -4.0], [-1.4, -0.6, pad]]))


def test_rpo_worked_examples():
    assert math.isclose(softplus(-0.15), L_DPO, rel_tol=1e-15)
    # Liu et al., cumulative
    out = _step(_loss("rpo", beta=0.1, alpha=0.005, reduction="sum_times_beta"), _dpo_worked())
    _close(out.loss.item(), 0.6259570477895321)
    _close(out.parts["loss/dpo"].item(), L_DPO)
    _close(out.parts["loss/sft"].item(), 10.0)  # -S(y_w), weighted by eta * beta
    out = _step(_loss("rpo", beta=0.1, alpha=0.2, reduction="mean_per_seq"), _dpo_worked())  # Liu et al., average
    _close(out.loss.item(), 1.2876237144561988)
    _close(out.parts["loss/sft"].item(), 10.0 / 3.0)
    # TRL's rpo_alpha = 1 on the 2-pair batch: token mean over the 5 chosen tokens = 2.4.
    out = _step(_loss("rpo", beta=0.1, alpha=1.0, reduction="token_mean_batch"), _rpo_two_pair_batch())
    _close(out.loss.item(), 3.04960836206549)
    _close(out.parts["loss/sft"].item(), 2.4)
    per_pair_dpo = [softplus(-0.15), softplus(-0.03)]
    assert out.metrics["rewards/margins"].tolist() == pytest.approx([0.15, 0.03], rel=RTOL)
    # The other reductions on the same batch: per-sequence mean NLL 13/6, summed NLL (10 + 2) / 2 times beta.
    mean_dpo = sum(per_pair_dpo) / 2
    out = _step(_loss("rpo", beta=0.1, alpha=1.0, reduction="mean_per_seq"), _rpo_two_pair_batch())
    _close(out.loss.item(), mean_dpo + 13.0 / 6.0)
    out = _step(_loss("rpo", beta=0.1, alpha=1.0, reduction="sum_times_beta"), _rpo_two_pair_batch())
    _close(out.loss.item(), mean_dpo + 0.1 * 6.0)


@pytest.mark.parametrize("reduction, expected", [
    ("token_mean_batch", 2.4), ("mean_per_seq", 13.0 / 6.0), ("sum_per_seq", 6.0)])
def test_sft_reductions_worked_example(reduction, expected):
    out = _step(_loss("sft", reduction=reduction), _rpo_two_pair_batch())
    _close(out.loss.item(), expected)
    assert out.metrics["nll/chosen"].tolist() == pytest.approx([10.0 / 3.0, 1.0], rel=RTOL)


@pytest.mark.parametrize("eps, spec_value", [(0.0, 0.620957), (0.1, 0.602207), (0.2, 0.570957), (0.4, 0.320957)])
def test_rdpo_worked_example(eps, spec_value):
    # Closed form at h = 1.5, beta = 0.1: [(1-eps) sp(-0.15) - eps sp(0.15)] / (1-2eps) = L_DPO - 0.15 eps / (1-2eps).
    exact = L_DPO - 0.15 * eps / (1 - 2 * eps)
    assert abs(exact - spec_value) <= 5e-7
    out = _step(_loss("rdpo", beta=0.1, eps=eps), _dpo_worked())
    _close(out.loss.item(), exact)
    _close(out.metrics["rewards/chosen"].item(), 0.1)
    _close(out.metrics["rewards/rejected"].item(), -0.05)


@pytest.mark.parametrize("eps, expected", [(0.1, -0.05875701546562505), (0.0, -0.04625701546562505)])
def test_rdpo_gradient_wrt_summed_logprob(eps, expected):
    """dL/dh at h = 1.5 (Appendix B). dS/dlp_t = 1, so every chosen token's gradient is dL/dS_w = dL/dh and every
    rejected token's is -dL/dh. The gradient is the trainer's (through the coefficients c = -dL/dlp)."""
    inputs = _dpo_worked(requires_grad=True)
    _, coefficients = _through_coefficients(_loss("rdpo", beta=0.1, eps=eps), inputs)
    torch.testing.assert_close(inputs.chosen_logps.grad, torch.full((1, 3), expected, dtype=F64), rtol=RTOL, atol=0)
    torch.testing.assert_close(inputs.rejected_logps.grad, torch.full((1, 3), -expected, dtype=F64), rtol=RTOL, atol=0)
    torch.testing.assert_close(coefficients["chosen_logps"], -inputs.chosen_logps.grad, rtol=RTOL, atol=0)
    torch.testing.assert_close(coefficients["rejected_logps"], -inputs.rejected_logps.grad, rtol=RTOL, atol=0)


def test_rdpo_is_unbounded_below():
    """At h = 60 (eps 0.1, beta 0.1) the loss is -0.7475 and its gradient does not vanish."""
    inputs = _dpo_worked(requires_grad=True)
    inputs.ref_chosen_logps[0, 0] -= 58.5  # S_ref,w = -69.5, so h = 2 - (-69.5 + 11.5) = 60
    out, _ = _through_coefficients(_loss("rdpo", beta=0.1, eps=0.1), inputs)
    _close(out.loss.item(), -0.7475243148622696)
    _close(out.loss.item(), softplus(-6.0) - 0.75)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    grad = -0.1 * (0.9 * sig(-6.0) + 0.1 * sig(6.0)) / 0.8
    assert grad < -0.01
    torch.testing.assert_close(inputs.chosen_logps.grad, torch.full((1, 3), grad, dtype=F64), rtol=RTOL, atol=0)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_rdpo_rejects_an_invalid_flip_rate(eps):
    with pytest.raises(RecipeError, match=r"(?s)eps.*0\.5"):
        _loss("rdpo", beta=0.1, eps=eps)


@pytest.mark.parametrize("name, params, words", [
    ("simpo", {"beta": 0.0}, "beta"),
    ("simpo", {"label_smoothing": 0.5}, "label_smoothing"),
    ("simpo", {"loss_type": "ipo"}, "loss_type"),
    ("rpo", {"alpha": -0.1}, "alpha"),
    ("rpo", {"reduction": "token_mean"}, "reduction"),
    ("sft", {"reduction": "sum"}, "reduction"),
    ("rdpo", {"beta": -1.0}, "beta"),
])
def test_invalid_parameters_raise_recipe_errors(name, params, words):
    with pytest.raises(RecipeError, match=words):
        _loss(name, **params)


# ====================================================================================== 2. gradients
B, T = 4, 7  # rows 0..2 are real pairs, row 3 is a zero-weight filler
CHOSEN_SPANS = [(0, 7), (2, 5), (1, 6), (3, 5)]  # (start, end): different lengths and offsets
REJECTED_SPANS = [(5, 7), (0, 6), (2, 6), (0, 7)]
REAL = 3


def _span_mask(spans) -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=F64)
    for i, (s, e) in enumerate(spans):
        mask[i, s:e] = 1.0
    return mask


def _random_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    mc, mr = _span_mask(CHOSEN_SPANS), _span_mask(REJECTED_SPANS)
    values = [-(torch.rand(B, T, generator=g, dtype=F64) * 3.0 + 0.05) * m for m in (mc, mr, mc, mr)]
    pc, pr, rc, rr = values
    return pc, pr, rc, rr, mc, mr


def _paper_simpo(pc, pr, mc, mr, beta, gamma, loss_type="sigmoid", ls=0.0, sft_weight=0.0):
    a_w = (pc * mc).sum(-1) / mc.sum(-1)
    a_l = (pr * mr).sum(-1) / mr.sum(-1)
    z = beta * (a_w - a_l) - gamma
    per_pair = (-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)) if loss_type == "sigmoid" else torch.relu(1 - z)
    return per_pair.mean() + sft_weight * (-(pc * mc).sum() / mc.sum())


def _h(pc, pr, rc, rr, mc, mr):
    return ((pc * mc).sum(-1) - (pr * mr).sum(-1)) - ((rc * mc).sum(-1) - (rr * mr).sum(-1))


def _paper_rdpo(pc, pr, rc, rr, mc, mr, beta, eps):
    h = _h(pc, pr, rc, rr, mc, mr)
    return (((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)).mean()


def _paper_sft(pc, mc, reduction):
    if reduction == "token_mean_batch":
        return -(pc * mc).sum() / mc.sum()
    if reduction == "mean_per_seq":
        return (-(pc * mc).sum(-1) / mc.sum(-1)).mean()
    return (-(pc * mc).sum(-1)).mean()


def _paper_rpo(pc, pr, rc, rr, mc, mr, beta, alpha, reduction):
    dpo = -F.logsigmoid(beta * _h(pc, pr, rc, rr, mc, mr)).mean()
    if reduction == "sum_times_beta":
        return dpo + alpha * beta * _paper_sft(pc, mc, "sum_per_seq")
    return dpo + alpha * _paper_sft(pc, mc, reduction)


def _simpo_hinge_gamma(pc, pr, mc, mr, beta):
    """A margin that puts the real pairs' z on both sides of the hinge at 1 (so both regimes are exercised)."""
    d = beta * ((pc * mc).sum(-1) / mc.sum(-1) - (pr * mr).sum(-1) / mr.sum(-1))[:REAL]
    return float((d.min() + d.max()) / 2 - 1)


GRADIENT_CASES = {
    "simpo-sigmoid": ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.3}),
    "simpo-sigmoid-ls": ("simpo", {"beta": 2.5, "gamma_beta_ratio": 0.55, "label_smoothing": 0.15}),
    "simpo-sigmoid-sft": ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.3, "sft_weight": 0.7}),
    "simpo-hinge": ("simpo", {"beta": 2.0, "loss_type": "hinge"}),
    "simpo-hinge-sft": ("simpo", {"beta": 2.0, "loss_type": "hinge", "sft_weight": 0.5}),
    "rdpo-0.1": ("rdpo", {"beta": 0.5, "eps": 0.1}),
    "rdpo-0.35": ("rdpo", {"beta": 0.5, "eps": 0.35}),
    "rpo-sum_times_beta": ("rpo", {"beta": 0.5, "alpha": 0.3, "reduction": "sum_times_beta"}),
    "rpo-mean_per_seq": ("rpo", {"beta": 0.5, "alpha": 0.3, "reduction": "mean_per_seq"}),
    "rpo-token_mean_batch": ("rpo", {"beta": 0.5, "alpha": 0.3, "reduction": "token_mean_batch"}),
    "sft-token_mean_batch": ("sft", {"reduction": "token_mean_batch"}),
    "sft-mean_per_seq": ("sft", {"reduction": "mean_per_seq"}),
    "sft-sum_per_seq": ("sft", {"reduction": "sum_per_seq"}),
}


def _case(case: str, pc, pr, mc, mr):
    name, params = GRADIENT_CASES[case]
    params = dict(params)
    if name == "simpo" and params.get("loss_type") == "hinge":
        params["gamma"] = _simpo_hinge_gamma(pc.detach(), pr.detach(), mc, mr, params["beta"])
    return name, params


def _paper_loss(name, params, pc, pr, rc, rr, mc, mr):
    if name == "simpo":
        gamma = params.get("gamma", params["beta"] * params.get("gamma_beta_ratio", 0.25))
        return _paper_simpo(pc, pr, mc, mr, params["beta"], gamma, params.get("loss_type", "sigmoid"),
                            params.get("label_smoothing", 0.0), params.get("sft_weight", 0.0))
    if name == "rdpo":
        return _paper_rdpo(pc, pr, rc, rr, mc, mr, params["beta"], params["eps"])
    if name == "rpo":
        return _paper_rpo(pc, pr, rc, rr, mc, mr, params["beta"], params["alpha"], params["reduction"])
    return _paper_sft(pc, mc, params["reduction"])


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_unified_core_gradient_equals_autograd_of_the_paper_formula(case):
    pc, pr, rc, rr, mc, mr = _random_inputs(seed=7)
    name, params = _case(case, pc, pr, mc, mr)
    if name == "simpo" and params.get("loss_type") == "hinge":
        z = params["beta"] * ((pc * mc).sum(-1) / mc.sum(-1) - (pr * mr).sum(-1) / mr.sum(-1))[:REAL] - params["gamma"]
        assert (z < 1).any() and (z > 1).any(), z
    plugin = build_loss([LossTerm(name=name, params=params)])

    # posttrain: all four rows, the last one a zero-weight filler; the step's counts cover the real rows only.
    # The gradient is the trainer's: coefficients c = -dL/dlp, then -sum c lp backpropagated into the leaves.
    leaves = [x.clone().requires_grad_(True) for x in (pc, pr)]
    out, coefficients = _through_coefficients(
        plugin, _inputs(leaves[0], leaves[1], mc, mr, rc, rr, pair_weight=_t([1.0, 1.0, 1.0, 0.0])))
    # The paper formula, by autograd, on the real rows.
    paper_leaves = [x[:REAL].clone().requires_grad_(True) for x in (pc, pr)]
    paper = _paper_loss(name, params, paper_leaves[0], paper_leaves[1], rc[:REAL], rr[:REAL], mc[:REAL], mr[:REAL])
    paper.backward()

    assert out.loss.dtype == F64
    _close(out.loss.item(), paper.item(), rtol=1e-12)
    for ours, theirs, mask, c in zip(leaves, paper_leaves, (mc, mr), coefficients.values()):
        torch.testing.assert_close(c, -ours.grad, rtol=0, atol=0)  # the gradient is -c, token by token
        if theirs.grad is None:  # SFT does not read the rejected responses: zero coefficients there
            assert name == "sft" and ours is leaves[1] and (ours.grad == 0).all()
            continue
        torch.testing.assert_close(ours.grad[:REAL], theirs.grad, rtol=RTOL, atol=1e-15)
        assert (ours.grad[REAL] == 0).all()  # the filler adds nothing
        assert (ours.grad[mask == 0] == 0).all()  # nor do masked positions
    assert paper_leaves[0].grad.abs().max() > 1e-4  # a gradient that is really there (so the comparison can fail)
    if name != "sft":
        assert paper_leaves[1].grad.abs().max() > 1e-4


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_micro_batch_split_changes_neither_loss_nor_gradient(case):
    """Global normalisation: the step's counts are given to every micro-batch, so summing micro-batch losses
    reproduces the one-batch loss and gradient (TRL's per-micro-batch token mean would not). Gradients are the
    trainer's, through the coefficients."""
    pc, pr, rc, rr, mc, mr = _random_inputs(seed=11)
    name, params = _case(case, pc, pr, mc, mr)
    plugin = build_loss([LossTerm(name=name, params=params)])
    weight = _t([1.0, 1.0, 1.0, 0.0])
    whole = [x.clone().requires_grad_(True) for x in (pc, pr)]
    full_inputs = _inputs(whole[0], whole[1], mc, mr, rc, rr, pair_weight=weight)
    counts = _counts(full_inputs)
    full, _ = _through_coefficients(plugin, full_inputs, counts)
    split = [x.clone().requires_grad_(True) for x in (pc, pr)]
    total = 0.0
    for rows in ([0], [1, 2, 3]):  # uneven: the long first chosen response alone
        sub = _inputs(split[0][rows], split[1][rows], mc[rows], mr[rows], rc[rows], rr[rows], pair_weight=weight[rows])
        part, _ = _through_coefficients(plugin, sub, counts)
        total = total + part.loss.item()
    _close(total, full.loss.item(), rtol=1e-12)
    for a, b in zip(split, whole):
        if name == "sft" and b is whole[1]:  # SFT does not read the rejected responses
            assert (a.grad == 0).all() and (b.grad == 0).all()
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-16)


# ---------------------------------------------------------------------- every pair loss, through a tiny model
# The trainer's gradient (coefficients c = -dL/dlp on detached log-probs, then -sum c lp through the model) equals
# autograd of the plug-in's step loss on the live log-probs, for every registered pair loss and for a user's loss
# that writes only its per-pair paper loss.
class UserMarginLoss(LossPlugin):
    """A user's loss as docs/custom_losses.md shows it: a plain LossPlugin subclass that returns its paper loss per
    pair, nothing about normalisation, coefficients or gradients."""

    needs_reference = True
    level = "sequence"

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        policy = sequence_sums(inputs.chosen_logps, inputs.chosen_mask) - sequence_sums(inputs.rejected_logps,
                                                                                        inputs.rejected_mask)
        reference = sequence_sums(inputs.ref_chosen_logps, inputs.chosen_mask) - sequence_sums(
            inputs.ref_rejected_logps, inputs.rejected_mask)
        return LossOutput(-F.logsigmoid(0.3 * (policy - reference)), {"user/margin": policy.detach()})


PAIR_LOSS_NAMES = sorted(name for name, cls in LOSSES.items() if cls.data_kind == "pairs")
PAIR_LOSS_CASES = {  # every registered pair loss at its defaults, and the variants below
    **{name: (name, {}) for name in PAIR_LOSS_NAMES},
    "dpo-ipo": ("dpo", {"loss_type": "ipo", "beta": 0.5}),
    "dpo-cdpo": ("dpo", {"label_smoothing": 0.2}),
    "dpo-reference_free": ("dpo", {"reference_free": True}),
    **{f"dpo-{t}": ("dpo", {"loss_type": t, "beta": 0.5, **extra}) for t, extra in [
        ("sigmoid_norm", {}), ("hinge", {}), ("exo_pair", {"label_smoothing": 0.01}), ("nca_pair", {}),
        ("bco_pair", {}), ("sppo_hard", {}), ("aot", {"label_smoothing": 0.1}), ("aot_unpaired", {}),
        ("apo_zero", {}), ("apo_down", {}), ("discopop", {})]},
    "cpo-ipo": ("cpo", {"loss_type": "ipo", "beta": 0.5}),
    "cpo-hinge": ("cpo", {"loss_type": "hinge", "cpo_alpha": 0.0}),
    "cpo-alphapo": ("cpo", {"alpha": 0.1, "label_smoothing": 0.1}),
    "orpo-0.5": ("orpo", {"beta": 0.5}),
    "rdpo-0.3": ("rdpo", {"eps": 0.3}),
    "rpo-sum_times_beta": ("rpo", {"alpha": 0.5, "reduction": "sum_times_beta"}),  # the default reduction
    "rpo-mean_per_seq": ("rpo", {"alpha": 0.5, "reduction": "mean_per_seq"}),
    "rpo-token_mean_batch": ("rpo", {"alpha": 0.5, "reduction": "token_mean_batch"}),
    "simpo-sft": ("simpo", {"sft_weight": 0.5}),
    "simpo-hinge-sft": ("simpo", {"loss_type": "hinge", "sft_weight": 0.5, "gamma": 0.0}),
    "sft-mean_per_seq": ("sft", {"reduction": "mean_per_seq"}),
    "sft-sum_per_seq": ("sft", {"reduction": "sum_per_seq"}),
    "tabpo-gate-split": ("tabpo", {"lam": 1.0}),  # tau set below so that the barrier gates about half the tokens
    "tabpo-no-token-weights": ("tabpo", {}),
    "user": (None, {}),
}
TINY_VOCAB, TINY_B = 64, 4  # pairs 0..2 are real, pair 3 a zero-weight filler
# (prompt length, chosen length, rejected length) of each pair: different lengths, so rows are right-padded.
TINY_LENGTHS = [(3, 5, 2), (2, 1, 6), (4, 3, 3), (1, 4, 2)]


def test_every_registered_pair_loss_has_a_case():
    assert {"dpo", "rdpo", "rpo", "sft", "simpo", "tabpo", "cpo", "orpo"} <= set(PAIR_LOSS_NAMES)  # registered
    assert {name for name, _ in PAIR_LOSS_CASES.values()} >= set(PAIR_LOSS_NAMES)


def _tiny_pair_batch(seed: int = 3):
    """Input ids of TINY_B chosen rows then TINY_B rejected rows ([2B, L], right padding), their attention and
    completion masks, and random positive per-token weights on the completions (TAB-PO's)."""
    g = torch.Generator().manual_seed(seed)
    length = max(p + max(c, r) for p, c, r in TINY_LENGTHS)
    ids = torch.full((2 * TINY_B, length), 2, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c, r) in enumerate(TINY_LENGTHS):
        prompt = torch.randint(3, TINY_VOCAB, (p,), generator=g)
        for row, n in ((i, c), (TINY_B + i, r)):
            ids[row, :p] = prompt
            ids[row, p:p + n] = torch.randint(3, TINY_VOCAB, (n,), generator=g)
            attention[row, :p + n] = 1
            completion[row, p:p + n] = 1
    weights = (torch.rand(2 * TINY_B, length - 1, generator=g, dtype=F64) + 0.5) * completion[:, 1:]
    return ids, attention, completion, weights


def _tiny_case(case: str, chosen_logps: torch.Tensor, chosen_mask: torch.Tensor):
    name, params = PAIR_LOSS_CASES[case]
    if name is None:
        return UserMarginLoss()
    params = dict(params)
    if case == "tabpo-gate-split":  # the median probability of the real chosen tokens: some gated, some not
        real = chosen_logps.detach()[:REAL][chosen_mask[:REAL].bool()]
        params["tau"] = float(real.median().exp())
    return build_loss([LossTerm(name=name, params=params)])


@pytest.mark.parametrize("case", list(PAIR_LOSS_CASES))
def test_gradient_through_coefficients_equals_autograd_of_the_step_loss(case):
    ids, attention, completion, weights = _tiny_pair_batch()
    model = make_tiny_model(TINY_VOCAB, seed=0, dtype=F64, hidden=16, layers=1)
    reference = make_tiny_model(TINY_VOCAB, seed=1, dtype=F64, hidden=16, layers=1)
    policy = PolicyLogProbs(model)
    with torch.no_grad():
        ref = PolicyLogProbs(reference)(ids, attention, completion)
    mask = completion[:, 1:].to(F64)
    mc, mr = mask[:TINY_B], mask[TINY_B:]
    pair_weight = _t([1.0, 1.0, 1.0, 0.0])
    no_weights = case == "tabpo-no-token-weights"
    base = PairLossInputs(
        chosen_logps=None, rejected_logps=None, chosen_mask=mc, rejected_mask=mr, pair_weight=pair_weight,
        ref_chosen_logps=ref[:TINY_B], ref_rejected_logps=ref[TINY_B:],
        chosen_token_weights=None if no_weights else weights[:TINY_B],
        rejected_token_weights=None if no_weights else weights[TINY_B:],
        extras={"kto_desirable": _t([1.0, 0.0, 1.0, 1.0])})  # KTO's label; the other losses ignore it
    # The step holds more than this micro-batch (the counts are global): 5 pairs and 9 more chosen tokens.
    counts = StepCounts(examples=5.0, tokens=float((mc * pair_weight[:, None]).sum()) + 9.0)

    def live():
        logps = policy(ids, attention, completion)
        return replace(base, chosen_logps=logps[:TINY_B], rejected_logps=logps[TINY_B:])

    plugin = _tiny_case(case, policy(ids, attention, completion)[:TINY_B], mc)
    if case == "tabpo-gate-split":
        with torch.no_grad():
            gate = policy(ids, attention, completion)[:TINY_B][:REAL][mc[:REAL].bool()] < math.log(plugin.params.tau)
        assert gate.any() and not gate.all()

    model.zero_grad(set_to_none=True)
    out, coefficients = _through_coefficients(plugin, live(), counts)
    through = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    direct = plugin.step_loss(live(), counts)
    assert direct.loss.dtype == F64 and direct.loss.requires_grad
    direct.loss.backward()
    autograd = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    _close(out.loss.item(), direct.loss.item(), rtol=1e-12)
    assert through.keys() == autograd.keys() and autograd
    assert max(float(g.abs().max()) for g in autograd.values()) > 1e-6  # a gradient that is really there
    for key, grad in autograd.items():
        torch.testing.assert_close(through[key], grad, rtol=RTOL, atol=1e-13 * float(grad.abs().max()))

    # The coefficients live on the real completion tokens only: none on the filler pair, none off the masks.
    c_w, c_l = coefficients["chosen_logps"], coefficients["rejected_logps"]
    for c, m in ((c_w, mc), (c_l, mr)):
        assert (c[REAL:] == 0).all() and (c[m == 0] == 0).all()
    assert (c_w[:REAL][mc[:REAL] == 1] != 0).any()
    reads_rejected = PAIR_LOSS_CASES[case][0] not in ("sft", "kto")  # KTO's mismatched side only feeds a detached KL
    assert (c_l[:REAL][mr[:REAL] == 1] != 0).any() == reads_rejected


def test_a_user_loss_gets_coefficients_from_the_core_with_no_extra_code():
    """A plain LossPlugin subclass (only `__call__`, per-pair values, level "sequence") gets per-token coefficients
    on every real chosen and rejected token: c = -dL/dlp, the same on each token of a response (L reads the sums),
    positive on chosen and negative on rejected tokens."""
    ids, attention, completion, _ = _tiny_pair_batch()
    model = make_tiny_model(TINY_VOCAB, seed=0, dtype=F64, hidden=16, layers=1)
    logps = PolicyLogProbs(model)(ids, attention, completion)
    mask = completion[:, 1:].to(F64)
    mc, mr = mask[:TINY_B], mask[TINY_B:]
    inputs = PairLossInputs(logps[:TINY_B], logps[TINY_B:], mc, mr, _t([1.0, 1.0, 1.0, 0.0]),
                            torch.zeros_like(mc), torch.zeros_like(mr))
    plugin = UserMarginLoss()
    assert type(plugin).step_loss is LossPlugin.step_loss  # nothing but __call__ is the user's
    counts = StepCounts(examples=3.0, tokens=float(mc[:REAL].sum()))
    out, coefficients = _through_coefficients(plugin, inputs, counts)
    assert math.isfinite(out.loss.item()) and "user/margin" in out.metrics
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad)
    # The coefficients in closed form: dL/dmargin per pair, divided by the step's pairs.
    margin = out.metrics["user/margin"]
    d_margin = -0.3 * torch.sigmoid(-0.3 * margin)
    expected = -d_margin * _t([1.0, 1.0, 1.0, 0.0]) / counts.examples
    c_w, c_l = coefficients["chosen_logps"], coefficients["rejected_logps"]
    torch.testing.assert_close(c_w, expected[:, None] * mc, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(c_l, -expected[:, None] * mr, rtol=RTOL, atol=0.0)
    assert (c_w[:REAL][mc[:REAL] == 1] > 0).all() and (c_l[:REAL][mr[:REAL] == 1] < 0).all()
    assert (c_w[REAL:] == 0).all() and (c_l[REAL:] == 0).all()


# ====================================================================================== 3. TRL parity
BETA = 0.1
PAIRS = {  # lengths differ so that chosen and rejected rows both get right padding
    "prompt": ["The sky is", "Two plus two is", "Water boils at", "My favourite colour"],
    "chosen": [" blue.", " four.", " one hundred degrees Celsius at sea level.", " is green"],
    "rejected": [" green and purple.", " five", " zero.", " is probably a secret I keep"],
}
# Reference sums = policy sums + these offsets, so the implicit rewards are known in closed form.
OFFSET_CHOSEN = _t([1.5, -2.0, 0.75, -0.25])
OFFSET_REJECTED = _t([-0.5, 1.0, 2.25, 0.5])
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]

DPO_TRAINER_CASES = {
    "robust-0.1": ({"loss_type": "robust", "label_smoothing": 0.1}, ("rdpo", {"beta": BETA, "eps": 0.1})),
    "robust-0.3": ({"loss_type": "robust", "label_smoothing": 0.3}, ("rdpo", {"beta": BETA, "eps": 0.3})),
    "sigmoid+sft": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]},
                    ("rpo", {"beta": BETA, "alpha": 0.7, "reduction": "token_mean_batch"})),
}


def _sum_on_first_token(sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token reference values whose masked sum is `sums` (all of it on the first completion token)."""
    per_token = torch.zeros_like(mask)
    per_token[torch.arange(mask.shape[0]), mask.argmax(dim=1)] = sums
    assert torch.equal((per_token * mask).sum(-1), sums)
    return per_token


@pytest.fixture
def dpo_trainer(request, tokenizer, tmp_path, monkeypatch):
    """A real TRL DPOTrainer (precomputed reference log-probs) on a tiny float64 model, and the posttrain term."""
    pytest.importorskip("trl", minversion="1.16")
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trl_kwargs, ours = DPO_TRAINER_CASES[request.param]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    model = make_tiny_model(len(tokenizer), seed=0, dtype=F64)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, precompute_ref_log_probs=True, report_to="none",
                     use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                     per_device_train_batch_size=len(PAIRS["prompt"]), max_length=None, save_strategy="no",
                     logging_strategy="no", seed=0, **trl_kwargs)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
    yield trainer, ours
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("dpo_trainer", list(DPO_TRAINER_CASES), indirect=True)
def test_rdpo_and_rpo_equal_trl_dpo_trainer(dpo_trainer):
    trainer, (name, params) = dpo_trainer
    assert trainer.beta == BETA and trainer.ld_alpha is None and not trainer.use_weighting
    assert trainer.precompute_ref_logps and trainer.ref_model is None
    model = trainer.model
    assert next(model.parameters()).dtype == F64

    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    n = len(dataset)
    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert input_ids.shape[0] == 2 * n  # [chosen..., rejected...]

    model.eval()
    with torch.no_grad():
        ours = PolicyLogProbs(model)(input_ids, attention_mask, completion_mask)
    model.train()
    mask = completion_mask[:, 1:].to(F64)
    assert (ours[mask == 0] == 0).all() and (ours[mask == 1] < 0).all()
    policy_sums = (ours * mask).sum(-1)
    trl_ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(F64)
    torch.testing.assert_close(trl_ref, policy_sums, rtol=1e-5, atol=1e-5)  # same tokens, same positions
    ref_chosen, ref_rejected = policy_sums[:n] + OFFSET_CHOSEN, policy_sums[n:] + OFFSET_REJECTED
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen.clone(), ref_rejected.clone()

    seen = {}
    trl_leaf = ours.clone().requires_grad_(True)

    def inject(module, args, kwargs, output):
        assert kwargs.get("fused_lm_head") is True
        assert torch.equal(output.log_probs != 0, ours != 0)
        torch.testing.assert_close(output.log_probs.to(F64), ours, rtol=1e-5, atol=1e-5)
        seen["called"] = True
        output.log_probs = trl_leaf
        return output

    handle = model.register_forward_hook(inject, with_kwargs=True)
    try:
        trainer._metrics["train"].clear()
        trl_loss = trainer._compute_loss(model, batch, return_outputs=False)
    finally:
        handle.remove()
    assert seen.get("called")
    trl_metrics = {k: trainer._metrics["train"][k] for k in METRICS}
    assert all(len(v) == 1 for v in trl_metrics.values()), trl_metrics
    trl_metrics = {k: v[0] for k, v in trl_metrics.items()}
    assert trl_loss.dtype == F64

    chosen_mask, rejected_mask = mask[:n], mask[n:]
    chosen_leaf, rejected_leaf = (x.clone().requires_grad_(True) for x in (ours[:n], ours[n:]))
    plugin = build_loss([LossTerm(name=name, params=params)])
    inputs = _inputs(chosen_leaf, rejected_leaf, chosen_mask, rejected_mask,
                     _sum_on_first_token(ref_chosen, chosen_mask), _sum_on_first_token(ref_rejected, rejected_mask))
    out, _ = _through_coefficients(plugin, inputs)  # posttrain's gradient: the trainer's path, into the leaves
    _close(out.loss.item(), trl_loss.item())
    for metric in METRICS:
        _close(out.metrics[metric].mean().item(), trl_metrics[metric])

    trl_loss.backward()
    ours_grad = torch.cat([chosen_leaf.grad, rejected_leaf.grad])
    assert (ours_grad[mask == 0] == 0).all() and (ours_grad[mask == 1] != 0).all()
    torch.testing.assert_close(ours_grad, trl_leaf.grad * mask, rtol=RTOL, atol=0.0)

    # Both equal the closed form of the known offsets.
    r_w, r_l = -BETA * OFFSET_CHOSEN, -BETA * OFFSET_REJECTED
    if name == "rdpo":
        eps = params["eps"]
        expected = ((-(1 - eps) * F.logsigmoid(r_w - r_l) + eps * F.logsigmoid(r_l - r_w)) / (1 - 2 * eps)).mean()
    else:
        # TRL's sft term: the token mean of -lp over all chosen completion tokens of the micro-batch...
        token_mean = -(ours[:n] * chosen_mask).sum() / chosen_mask.sum()
        expected = -F.logsigmoid(r_w - r_l).mean() + params["alpha"] * token_mean
        # ...not the mean over pairs of per-sequence means (the responses' lengths differ, so the two differ).
        per_seq = _step(_loss("rpo", beta=BETA, alpha=params["alpha"], reduction="mean_per_seq"), inputs).loss.item()
        assert abs(per_seq - trl_loss.item()) > 1e-3, (per_seq, trl_loss.item())
    _close(trl_loss.item(), expected.item())


SIMPO_BETA, SIMPO_RATIO = 2.0, 0.4
SIMPO_TRL = {"loss_type": "simpo", "beta": SIMPO_BETA, "simpo_gamma": SIMPO_BETA * SIMPO_RATIO}
CPO_CASES = {  # CPOConfig -> (posttrain loss, params). SimPO's sft_weight and CPO's cpo_alpha: token-mean NLL.
    "simpo": ({**SIMPO_TRL, "cpo_alpha": 0.0}, "simpo", {"beta": SIMPO_BETA, "gamma_beta_ratio": SIMPO_RATIO}),
    "simpo+sft+ls": ({**SIMPO_TRL, "cpo_alpha": 0.5, "label_smoothing": 0.1},
                     "simpo", {"beta": SIMPO_BETA, "gamma_beta_ratio": SIMPO_RATIO, "sft_weight": 0.5,
                               "label_smoothing": 0.1}),
    "cpo-sigmoid": ({"loss_type": "sigmoid", "beta": 0.1}, "cpo", {"beta": 0.1}),
    "cpo-sigmoid-ls": ({"loss_type": "sigmoid", "beta": 0.5, "cpo_alpha": 0.3, "label_smoothing": 0.2},
                       "cpo", {"beta": 0.5, "cpo_alpha": 0.3, "label_smoothing": 0.2}),
    "cpo-hinge": ({"loss_type": "hinge", "beta": 0.1}, "cpo", {"beta": 0.1, "loss_type": "hinge"}),
    "cpo-hinge-nonll": ({"loss_type": "hinge", "beta": 0.05, "cpo_alpha": 0.0},
                        "cpo", {"beta": 0.05, "loss_type": "hinge", "cpo_alpha": 0.0}),
    "cpo-ipo": ({"loss_type": "ipo", "beta": 0.5, "cpo_alpha": 0.0}, "cpo",
                {"beta": 0.5, "loss_type": "ipo", "cpo_alpha": 0.0}),
    "cpo-ipo-nll": ({"loss_type": "ipo", "beta": 0.1}, "cpo", {"beta": 0.1, "loss_type": "ipo"}),
    "cpo-alphapo": ({"loss_type": "sigmoid", "beta": 0.1, "alpha": 0.05}, "cpo", {"beta": 0.1, "alpha": 0.05}),
}


@pytest.fixture
def cpo_trainer(request, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("trl", minversion="1.16")
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    trl_kwargs, name, ours = CPO_CASES[request.param]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    model = make_tiny_model(len(tokenizer), seed=0, dtype=F64)
    args = CPOConfig(output_dir=str(tmp_path / "cpo"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=len(PAIRS["prompt"]), max_length=512, save_strategy="no",
                     logging_strategy="no", seed=0, **trl_kwargs)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
    yield trainer, name, ours
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("cpo_trainer", list(CPO_CASES), indirect=True)
def test_simpo_and_cpo_equal_trl_cpo_trainer(cpo_trainer):
    """TRL computes its own (average or summed) log-probs from the float64 logits (`get_batch_logps`) and its own
    NLL (`nn.CrossEntropyLoss` over the chosen completion tokens of the micro-batch)."""
    trainer, name, params = cpo_trainer
    assert trainer.loss_type == params.get("loss_type", "simpo" if name == "simpo" else "sigmoid")
    assert trainer.alpha == params.get("alpha", 0.0) and trainer.beta == params["beta"]
    model = trainer.model
    assert next(model.parameters()).dtype == F64
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    n = len(dataset)

    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    assert trl_loss.dtype == F64
    model.zero_grad(set_to_none=True)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # posttrain on TRL's own concatenated batch: loss mask = TRL's labels (-100 on prompt and padding).
    cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.pad_token_id,
                                      device=torch.device("cpu"))
    ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    labels = cat["concatenated_labels"]
    completion = (labels != -100).long()
    assert torch.equal(labels[completion.bool()], ids[completion.bool()])  # labels are the completion's own tokens
    logps = PolicyLogProbs(model)(ids, attention, completion)
    mask = completion[:, 1:].to(F64)
    assert len({int(x) for x in mask[:n].sum(-1)}) > 1  # responses of different lengths: averaging matters
    # The gradient is the trainer's: coefficients on detached log-probs, -sum c lp backpropagated into the model.
    out, _ = _through_coefficients(_loss(name, **params), _inputs(logps[:n], logps[n:], mask[:n], mask[n:]))
    _close(out.loss.item(), trl_loss.item())
    for metric in METRICS:
        _close(out.metrics[metric].mean().item(), trl_metrics[metric])
    if params.get("sft_weight") or (name == "cpo" and params.get("cpo_alpha", 1.0)):
        _close(out.parts["loss/sft"].item(), trl_metrics["nll_loss"])
    else:
        assert trl_metrics["nll_loss"] == 0.0
    ours = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == trl_grads.keys() and ours
    for key, grad in trl_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(ours[key], grad, rtol=RTOL, atol=1e-12 * float(grad.abs().max()))


# ====================================================================================== 4. no reference pass
def test_reference_needs_are_declared():
    assert not _loss("simpo").needs_reference
    assert not build_loss([LossTerm(name="simpo"), LossTerm(name="sft", weight=0.1)]).needs_reference
    assert _loss("rdpo").needs_reference and _loss("rpo").needs_reference and _loss("dpo").needs_reference


@pytest.mark.parametrize("loss, expected_reference_passes", [("simpo", 0), ("dpo", 2)])
def test_reference_free_simpo_never_runs_a_reference_pass(tiny_model_dir, tmp_path, monkeypatch, loss,
                                                          expected_reference_passes):
    counts = {"reference_logps": 0, "reference_context": 0, "forward": 0}
    original_ref, original_ctx, original_fwd = Reference.log_probs, Reference.context, PolicyLogProbs.forward

    def counting_ref(self, *args, **kwargs):
        counts["reference_logps"] += 1
        return original_ref(self, *args, **kwargs)

    def counting_ctx(self, *args, **kwargs):
        counts["reference_context"] += 1
        return original_ctx(self, *args, **kwargs)

    def counting_fwd(self, *args, **kwargs):
        counts["forward"] += 1
        return original_fwd(self, *args, **kwargs)

    monkeypatch.setattr(Reference, "log_probs", counting_ref)
    monkeypatch.setattr(Reference, "context", counting_ctx)
    monkeypatch.setattr(PolicyLogProbs, "forward", counting_fwd)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": loss},
                      data={"train": {"builtin": "tiny", "split": "train", "num_rows": 16}, "heldout": None},
                      train={"batch_size": 4, "micro_batch_size": 4, "max_steps": 2},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    setup_forwards = counts["forward"]  # set-up's probe of the log-probs against the model's forward (no reference)
    records = [trainer.train_step(step) for step in range(2)]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert counts["reference_logps"] == expected_reference_passes, counts  # set-up included
    assert counts["reference_context"] == expected_reference_passes, counts
    assert counts["forward"] - setup_forwards == 2 + expected_reference_passes, counts  # one policy forward per step
    if loss == "simpo":
        assert trainer.reference.kind == "none" and trainer.reference.model is None
        assert trainer.step.reference_cache is None


# ====================================================================================== 5. training
@pytest.mark.parametrize("loss, accuracy_key", [
    ({"name": "simpo", "params": {"beta": 2.0, "gamma_beta_ratio": 0.5}}, "ranking_accuracy_normalised"),
    ({"name": "rpo", "params": {"beta": 0.1, "alpha": 0.2, "reduction": "mean_per_seq"}}, "ranking_accuracy"),
    ({"name": "rdpo", "params": {"beta": 0.1, "eps": 0.2}}, "ranking_accuracy"),
    ({"name": "cpo", "params": {"beta": 0.1}}, "ranking_accuracy"),
    ({"name": "orpo", "params": {"beta": 0.5}}, "ranking_accuracy_normalised"),
] + [({"name": "dpo", "params": {"beta": 0.1, "loss_type": loss_type, **extra}}, "ranking_accuracy")
     for loss_type, extra in [("sigmoid_norm", {}), ("hinge", {}), ("exo_pair", {"label_smoothing": 1e-3}),
                              ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}), ("aot", {}),
                              ("aot_unpaired", {}), ("apo_zero", {}), ("apo_down", {}),
                              ("discopop", {"discopop_tau": 0.5})]],  # TRL's tau 0.05: see the test below
    ids=lambda loss: f"{loss['name']}-{loss['params'].get('loss_type', '')}" if isinstance(loss, dict) else loss)
def test_loss_trains_the_tiny_task(tiny_model_dir, tmp_path, loss, accuracy_key):
    # lr 1e-2 over 24 steps takes every loss here (and every seed tried, 0-2) to >= 0.98 held-out accuracy;
    # 2e-2 overshoots for rdpo.
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss=loss,
                      train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 24, "lr": 1e-2},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    summary = Trainer(recipe_from(raw)).train()
    before, after = summary["heldout_before"][accuracy_key], summary["heldout_after"][accuracy_key]
    assert after >= before + 0.25 and after >= 0.9, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert len(train_lines) == 24
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"]
    if loss["name"] == "rpo":
        assert {"loss/dpo", "loss/sft"} <= set(train_lines[-1])


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_slope_at_the_reference_follows_its_formula(tau):
    """DiscoPOP's loss at z = beta h = 0 has slope dL/dz = -3/4 + (1 - ln 2) / (4 tau): positive for tau < 0.102,
    so with TRL's default tau = 0.05 a policy that starts at its reference first lowers every margin (on the
    tiny task 24 steps take held-out ranking accuracy from 0.53 to 0.00); with tau = 0.5 it trains (above)."""
    from posttrain.losses import PairLossInputs, build_loss

    beta = 0.1
    h = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    zeros, ones = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    inputs = PairLossInputs(chosen_logps=h, rejected_logps=zeros, chosen_mask=ones, rejected_mask=ones,
                            pair_weight=torch.ones(1, dtype=torch.float64), ref_chosen_logps=zeros,
                            ref_rejected_logps=zeros)
    plugin = build_loss([LossTerm(name="dpo", params={"beta": beta, "loss_type": "discopop", "discopop_tau": tau})])
    plugin(inputs).loss.sum().backward()
    slope = -0.75 + (1 - math.log(2)) / (4 * tau)
    assert h.grad.item() == pytest.approx(beta * slope, rel=1e-12)
    assert (h.grad.item() > 0) == (tau < 0.102)


# ====================================================================================== ORPO
def test_orpo_worked_example_by_hand():
    """One pair with mean completion log-probs A_w = -0.5, A_l = -1.0 (two tokens each), beta = 0.1:
    log odds(y) = A - log(1 - e^A); L_OR = -logsigmoid(log odds_w - log odds_l); L = NLL + beta L_OR,
    the NLL being the token mean of -lp over the chosen tokens (0.5)."""
    odds_w = -0.5 - math.log(1 - math.exp(-0.5))
    odds_l = -1.0 - math.log(1 - math.exp(-1.0))
    l_or = math.log1p(math.exp(-(odds_w - odds_l)))
    assert l_or == pytest.approx(0.3203, abs=1e-4)  # by hand: 0.432752 - (-0.541325) = 0.974077 -> 0.320321
    chosen = torch.tensor([[-0.25, -0.75]], dtype=F64)
    rejected = torch.tensor([[-1.5, -0.5]], dtype=F64)
    ones = torch.ones(1, 2, dtype=F64)
    out = _step(_loss("orpo", beta=0.1), _inputs(chosen, rejected, ones, ones.clone()))
    assert math.isclose(out.loss.item(), 0.5 + 0.1 * l_or, rel_tol=1e-12)
    assert math.isclose(out.metrics["log_odds_chosen"].item(), odds_w - odds_l, rel_tol=1e-12)
    assert math.isclose(out.parts["loss/sft"].item(), 0.5, rel_tol=1e-12)


def test_orpo_odds_ratio_term_equals_trls_odds_ratio_loss():
    """TRL 1.16's experimental ORPOTrainer.odds_ratio_loss on the same mean log-probs (TRL casts them to float32,
    hence rtol 1e-6); TRL's NLL term differs by design (it covers the prompt too), so only this term is TRL's."""
    pytest.importorskip("trl", minversion="1.16")
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    generator = torch.Generator().manual_seed(5)
    chosen, rejected = (-3 * torch.rand(6, 4, generator=generator, dtype=F64) for _ in range(2))
    mask = torch.ones(6, 4, dtype=F64)
    mask[1, 3] = mask[4, 2:] = 0
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    a_w, a_l = ((x * mask).sum(-1) / mask.sum(-1) for x in (chosen, rejected))
    trl_losses, trl_w, trl_l, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, a_w, a_l)
    from posttrain.losses.orpo import OddsRatio

    out = OddsRatio(SimpleNamespace(beta=0.25))(_inputs(chosen, rejected, mask, mask.clone()))
    torch.testing.assert_close(out.loss, -trl_losses.to(F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.metrics["rewards/chosen"], trl_w.to(F64), rtol=1e-6, atol=0)
    assert out.metrics["log_odds_ratio"].mean().item() == pytest.approx(trl_ratio.item(), rel=1e-6)
    assert out.metrics["log_odds_chosen"].mean().item() == pytest.approx(trl_log_odds.item(), rel=1e-6)
