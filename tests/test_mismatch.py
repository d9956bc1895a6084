"""Engine/trainer mismatch correction (posttrain.core.mismatch): the weights by hand, their effect on the gradient
through the core, and exactly zero mismatch with the hf engine."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import recipe_from
from posttrain.core import backward_through_coefficients
from posttrain.core.mismatch import mismatch_weights
from posttrain.core.unified import StepLoss
from posttrain.trainer import Trainer

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, 0.0]], dtype=torch.float64)
ENGINE = torch.tensor([[-1.0, -3.0, -0.1], [-0.3, -0.2, -9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token of row 1 is padding: its huge gap must not count


def test_token_level_tis_and_mask_weights_by_hand():
    tis = mismatch_weights(OLD, ENGINE, MASK, "tis", "token", cap=2.0)
    # ratios exp(old - engine): row 0: 1, e (> 2: truncated to 2), exp(-0.4); row 1: 1, 1, (padding)
    expected = torch.tensor([[1.0, 2.0, math.exp(-0.4)], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(tis.weights[MASK.bool()], expected[MASK.bool()], atol=1e-12)
    assert tis.above_cap == 1 and tis.outside_band == 1 and tis.tokens == 5
    assert tis.delta_sum == pytest.approx(1.0 - 0.4) and tis.delta_abs_max == pytest.approx(1.0)
    masked = mismatch_weights(OLD, ENGINE, MASK, "mask", "token", cap=2.0)
    assert masked.weights[0].tolist() == [1.0, 0.0, 1.0] and masked.weights[1, :2].tolist() == [1.0, 1.0]
    masked_tight = mismatch_weights(OLD, ENGINE, MASK, "mask", "token", cap=1.2)  # exp(-0.4) < 1 / 1.2
    assert masked_tight.weights[0].tolist() == [1.0, 0.0, 0.0] and masked_tight.outside_band == 2


def test_sequence_level_weights_use_the_completion_s_summed_log_ratio():
    out = mismatch_weights(OLD, ENGINE, MASK, "tis", "sequence", cap=5.0)
    row0 = math.exp(0.0 + 1.0 - 0.4)
    assert torch.allclose(out.weights[0], torch.full((3,), row0, dtype=torch.float64))
    assert torch.allclose(out.weights[1, :2], torch.ones(2, dtype=torch.float64))
    assert mismatch_weights(OLD, ENGINE, MASK, "mask", "sequence", cap=1.5).weights[0].tolist() == [0.0] * 3


def test_the_weights_scale_each_token_s_coefficient_in_the_gradient():
    theta = torch.tensor([[0.3, -0.7, 1.1]], dtype=torch.float64, requires_grad=True)
    logps = torch.log_softmax(theta, -1).expand(2, 3)
    weights = torch.tensor([[0.5, 2.0, 1.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)

    def loss(leaves):
        return StepLoss(-(advantages * leaves["logps"]).sum(), {}, {})

    _, coefficients = backward_through_coefficients(loss, {"logps": logps}, lambda s: s.backward(), {"logps": weights})
    assert torch.equal(coefficients["logps"], advantages.expand(2, 3) * weights)
    by_hand = torch.autograd.grad(-(advantages * weights * torch.log_softmax(theta, -1).expand(2, 3)).sum(),
                                  theta)[0]
    assert torch.allclose(theta.grad, by_hand, atol=1e-12)


def test_with_the_hf_engine_the_mismatch_is_exactly_zero(tiny_model_dir, tmp_path, monkeypatch):
    from test_online import TESTS, online_recipe, train_steps

    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    raw = online_recipe(tiny_model_dir, out, train={"max_steps": 2},
                        rollout={"updates_per_batch": 2, "mismatch": {"correction": "tis"}})
    Trainer(recipe_from(raw)).train()
    steps = train_steps(out)
    assert len(steps) == 2
    for m in steps:
        assert m["mismatch/log_ratio_mean"] == 0.0 and m["mismatch/log_ratio_abs_max"] == 0.0
        assert m["mismatch/above_cap_share"] == 0.0 and m["mismatch/outside_band_share"] == 0.0


def test_the_recipe_check_refuses_bad_engine_settings(tiny_model_dir, tmp_path):
    from test_online import online_recipe

    from posttrain.errors import RecipeError

    raw = online_recipe(tiny_model_dir, tmp_path / "run", rollout={"engine": "vllm_server",
                                                                     "mismatch": {"cap": 1.0}})
    raw["lora"] = {"enabled": False}
    with pytest.raises(RecipeError) as caught:
        recipe_from(raw)
    assert "rollout.mismatch.cap must be above 1" in str(caught.value)
    assert "rollout.engine vllm_server loads LoRA adapters only" in str(caught.value)
