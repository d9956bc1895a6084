"""Several losses in one recipe: a weighted sum, each term aggregated at its own level and logged as a part."""

from __future__ import annotations

import torch

from posttrain.config import LossTerm
from posttrain.core import StepCounts
from posttrain.losses import CombinedLoss, PairLossInputs, build_loss


def _inputs():
    d = torch.float64
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(3, 5, dtype=d, generator=g), -torch.rand(3, 5, dtype=d, generator=g)
    mask_c = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=d)
    mask_r = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=d)
    chosen, rejected = (chosen * mask_c).requires_grad_(), (rejected * mask_r).requires_grad_()
    ref_c, ref_r = -torch.rand(3, 5, dtype=d, generator=g) * mask_c, -torch.rand(3, 5, dtype=d, generator=g) * mask_r
    counts = StepCounts(examples=3, tokens=float(mask_c.sum()))  # tokens: the chosen responses'
    return PairLossInputs(chosen, rejected, mask_c, mask_r, torch.ones(3, dtype=d), ref_c, ref_r), counts


def test_weighted_sum_of_terms_with_parts_logged():
    combined = build_loss([LossTerm("dpo", 1.0, {"beta": 0.2}), LossTerm("sft", 0.5)])
    assert isinstance(combined, CombinedLoss) and combined.needs_reference
    inputs, counts = _inputs()
    out = combined.step_loss(inputs, counts)
    dpo = build_loss([LossTerm("dpo", 1.0, {"beta": 0.2})]).step_loss(inputs, counts).loss
    sft = build_loss([LossTerm("sft")]).step_loss(inputs, counts).loss
    assert abs(out.loss.item() - (dpo.item() + 0.5 * sft.item())) < 1e-12
    assert abs(out.parts["loss/sft"].item() - sft.item()) < 1e-12
    assert "rewards/margins" in out.metrics and "nll/chosen" in out.metrics
    (grad_combined,) = torch.autograd.grad(out.loss, inputs.chosen_logps)
    (grad_dpo,) = torch.autograd.grad(dpo, inputs.chosen_logps)
    (grad_sft,) = torch.autograd.grad(sft, inputs.chosen_logps)
    torch.testing.assert_close(grad_combined, grad_dpo + 0.5 * grad_sft, rtol=1e-12, atol=1e-15)


def test_reference_free_terms_alone_need_no_reference():
    assert not build_loss([LossTerm("sft"), LossTerm("simpo", 0.5)]).needs_reference
    assert not build_loss([LossTerm("dpo", params={"reference_free": True})]).needs_reference
