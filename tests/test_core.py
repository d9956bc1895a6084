"""The core: per-token log-probs (memory contract, equality with a plain forward) and the unified
policy-gradient estimator (its gradient equals autograd of the paper losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from posttrain.config import LossTerm
from posttrain.core import Normaliser, PolicyLogProbs, policy_gradient_surrogate
from posttrain.losses import PairLossInputs, build_loss

VOCAB = 300


def _batch(seed=0, n=4, length=12, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    attention = torch.ones(n, length, dtype=torch.long)
    loss_mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        prompt = 3 + i % 3
        end = length - (i % 2) * 3  # some rows padded on the right
        attention[i, end:] = 0
        loss_mask[i, prompt:end] = 1
    return ids, attention, loss_mask


def test_logprobs_equal_plain_forward_float64():
    model = make_tiny_model(VOCAB, dtype=torch.float64)
    ids, attention, loss_mask = _batch()
    ours = PolicyLogProbs(model, chunk_size=5)(ids, attention, loss_mask)
    logits = model(input_ids=ids, attention_mask=attention).logits
    direct = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * loss_mask[:, 1:]
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-12)
    assert (ours[loss_mask[:, 1:] == 0] == 0).all()


def test_saved_tensors_never_hold_full_vocabulary_logits():
    vocab = 4096  # larger than any other dimension, so a saved logits tensor is recognisable
    model = make_tiny_model(vocab)
    ids, attention, loss_mask = _batch(vocab=vocab, length=40)
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = PolicyLogProbs(model, chunk_size=16)(ids, attention, loss_mask)
    logps.sum().backward()
    assert shapes, "the hook saw no saved tensor at all"
    assert not [s for s in shapes if s and s[-1] == vocab], f"full-vocabulary tensors were saved: {shapes}"
    # The same hook does see logits when they are computed plainly (so the check can fail).
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=attention).logits
        F.log_softmax(logits, -1).sum().backward()
    assert [s for s in shapes if s and s[-1] == vocab]
    assert model.model.embed_tokens.weight.grad is not None


def _dpo_paper_loss(pc, pr, rc, rr, mc, mr, beta):
    h = ((pc * mc).sum(-1) - (pr * mr).sum(-1)) - ((rc * mc).sum(-1) - (rr * mr).sum(-1))
    return -F.logsigmoid(beta * h).mean()


@pytest.mark.parametrize("loss_name", ["dpo", "dpo_ipo", "dpo_cdpo", "sft"])
def test_unified_core_gradient_equals_autograd_of_paper_loss(loss_name):
    """Through a real model: the gradient the plug-in sends through the unified core equals the
    gradient of the paper's loss, to 1e-9 in float64, and the logged value is the paper loss."""
    model = make_tiny_model(VOCAB, dtype=torch.float64, seed=1)
    ids, attention, loss_mask = _batch(seed=2, n=6)
    b = 3
    ref = torch.randn(6, ids.shape[1] - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    params = {"dpo": {"beta": 0.5}, "dpo_ipo": {"beta": 0.5, "loss_type": "ipo"},
              "dpo_cdpo": {"beta": 0.5, "label_smoothing": 0.2}, "sft": {}}[loss_name]
    plugin = build_loss([LossTerm(name=loss_name.split("_")[0], params=params)])
    mask = loss_mask[:, 1:].double()

    def run(use_plugin: bool):
        model.zero_grad()
        logps = PolicyLogProbs(model)(ids, attention, loss_mask)
        pc, pr, mc, mr = logps[:b], logps[b:], mask[:b], mask[b:]
        rc, rr = ref[:b] * mc, ref[b:] * mr
        if use_plugin:
            inputs = PairLossInputs(pc, pr, mc, mr, Normaliser(b, mask.sum().item(), mc.sum().item()),
                                    torch.ones(b, dtype=torch.float64), rc, rr)
            loss = plugin(inputs).loss
        elif loss_name == "sft":
            loss = -(pc * mc).sum() / mc.sum()
        elif loss_name == "dpo_ipo":
            h = ((pc - rc) * mc).sum(-1) / mc.sum(-1) - ((pr - rr) * mr).sum(-1) / mr.sum(-1)
            loss = ((h - 1 / (2 * 0.5)) ** 2).mean()
        elif loss_name == "dpo_cdpo":
            h = ((pc - rc) * mc).sum(-1) - ((pr - rr) * mr).sum(-1)
            loss = (-(0.8) * F.logsigmoid(0.5 * h) - 0.2 * F.logsigmoid(-0.5 * h)).mean()
        else:
            loss = _dpo_paper_loss(pc, pr, rc, rr, mc, mr, 0.5)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    value_core, grads_core = run(True)
    value_paper, grads_paper = run(False)
    torch.testing.assert_close(value_core, value_paper, rtol=1e-12, atol=0)
    assert any(g.abs().max() > 1e-6 for g in grads_paper)
    for gc, gp in zip(grads_core, grads_paper):
        torch.testing.assert_close(gc, gp, rtol=1e-9, atol=1e-15)


def test_unified_estimator_sft_sanity_example():
    """Spec section 10: softmax logits [1, 0, -1], target 0: (1/p_0) * 1 * grad p_0 = grad log p_0."""
    z = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[:, :1]
    loss = policy_gradient_surrogate(lp, lp, torch.ones_like(lp), torch.ones_like(lp), 1.0)
    (grad,) = torch.autograd.grad(-loss, z)
    torch.testing.assert_close(grad[0], torch.tensor([0.334759, -0.244728, -0.090031], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_stabilisation_mask_and_reference_denominator():
    """With pi_ref = pi_old the surrogate is the importance-weighted one: d/dlp of A*exp(lp-lp_old)."""
    lp = torch.tensor([[-0.5, -0.4]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.6, -0.4]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    stable = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss = policy_gradient_surrogate(lp, old, adv, torch.ones_like(lp), 2.0, stable)
    (grad,) = torch.autograd.grad(loss, lp)
    expected = -torch.tensor([[2.0 * math.exp(0.1) / 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
