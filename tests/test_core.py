"""The core: per-token log-probs (memory contract, equality with a plain forward) and the unified
policy-gradient estimator (its gradient equals autograd of the paper losses)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from posttrain.config import LossTerm
from posttrain.core import PolicyLogProbs, StepCounts, StepLoss, aggregate, backward_through_coefficients
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
    """Through a real model: the gradient the core sends through the coefficients c = -dL/dlp equals the
    gradient of the paper's loss written here, to 1e-9 in float64, and the logged value is the paper loss."""
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
            inputs = PairLossInputs(pc, pr, mc, mr, torch.ones(b, dtype=torch.float64), rc, rr)
            counts = StepCounts(examples=b, tokens=mc.sum().item())
            out, coefficients = backward_through_coefficients(
                lambda leaves: plugin.step_loss(replace(inputs, **leaves), counts),
                {"chosen_logps": pc, "rejected_logps": pr}, lambda surrogate: surrogate.backward())
            assert set(coefficients) == {"chosen_logps", "rejected_logps"}
            return out.loss, [p.grad.clone() for p in model.parameters()]
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


def test_coefficients_are_the_unified_advantage_of_dpo():
    """Spec section 10: DPO's coefficient is +beta sigma(-beta h) on every chosen token and -beta sigma(-beta h)
    on every rejected token (per pair; the core's c is that over the step's pair count)."""
    beta, b, t = 0.5, 2, 3
    g = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(b, t, dtype=torch.float64, generator=g) for _ in range(2))
    rc, rr = (-torch.rand(b, t, dtype=torch.float64, generator=g) for _ in range(2))
    mask = torch.ones(b, t, dtype=torch.float64)
    inputs = PairLossInputs(pc, pr, mask, mask, torch.ones(b, dtype=torch.float64), rc, rr)
    plugin = build_loss([LossTerm(name="dpo", params={"beta": beta})])
    _, c = backward_through_coefficients(lambda leaves: plugin.step_loss(replace(inputs, **leaves),
                                                                         StepCounts(b, mask.sum().item())),
                                         {"chosen_logps": pc.clone().requires_grad_(), "rejected_logps": pr.clone()},
                                         lambda surrogate: None)
    h = (pc.sum(-1) - pr.sum(-1)) - (rc.sum(-1) - rr.sum(-1))
    expected = beta * torch.sigmoid(-beta * h) / b
    torch.testing.assert_close(c["chosen_logps"], expected[:, None].expand(b, t), rtol=1e-12, atol=0)
    torch.testing.assert_close(c["rejected_logps"], -expected[:, None].expand(b, t), rtol=1e-12, atol=0)


def test_unified_estimator_sft_sanity_example():
    """Spec section 10: softmax logits [1, 0, -1], target 0: the SFT coefficient is 1, and the gradient the
    core sends, c * grad log p_0 = (1/p_0) * grad p_0, is [0.334759, -0.244728, -0.090031]."""
    z = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[:, :1]
    one = torch.ones_like(lp)
    inputs = PairLossInputs(lp, lp.detach(), one, torch.zeros_like(lp), torch.ones(1, dtype=torch.float64))
    sft = build_loss([LossTerm(name="sft")])
    grads = []
    _, c = backward_through_coefficients(lambda leaves: sft.step_loss(replace(inputs, **leaves), StepCounts(1, 1)),
                                         {"chosen_logps": lp}, lambda s: grads.append(torch.autograd.grad(-s, z)[0]))
    assert c["chosen_logps"].item() == 1.0
    torch.testing.assert_close(grads[0][0], torch.tensor([0.334759, -0.244728, -0.090031], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_a_direct_term_is_backpropagated_as_it_is_and_a_constant_loss_gives_zero_coefficients():
    lp = torch.tensor([[-0.5, -0.4]], dtype=torch.float64, requires_grad=True)
    extra = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    seen = []
    out, c = backward_through_coefficients(
        lambda leaves: StepLoss(leaves["logps"].sum() * 0 + 1.0, {}, {}, direct=3 * extra), {"logps": lp},
        lambda surrogate: seen.append(surrogate) or surrogate.backward())
    assert out.loss.item() == 1.0 and float(c["logps"].abs().sum()) == 0.0
    assert extra.grad.item() == 3.0 and lp.grad is not None and float(lp.grad.abs().sum()) == 0.0
    _, c = backward_through_coefficients(lambda leaves: StepLoss(torch.tensor(0.0), {}, {}), {"logps": lp},
                                         lambda s: None)
    assert float(c["logps"].abs().sum()) == 0.0


def test_aggregation_levels_and_shape_errors():
    values, weight = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert aggregate(values, "sequence", weight, mask, StepCounts(6, 10)).item() == pytest.approx(3 / 6)
    per_token = torch.tensor([[1.0, 2.0], [3.0, 9.0], [5.0, 5.0]])
    assert aggregate(per_token, "token", weight, mask, StepCounts(6, 10)).item() == pytest.approx(6 / 10)
    with pytest.raises(ValueError, match="one value per example"):
        aggregate(per_token, "sequence", weight, mask, StepCounts(6, 10))
    with pytest.raises(ValueError, match="one value per token"):
        aggregate(values, "token", weight, mask, StepCounts(6, 10))


def _gemma2_like(softcap: float):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=softcap, attn_logit_softcapping=50.0, sliding_window=16,
                          attn_implementation="eager")
    return Gemma2ForCausalLM(config).double()


def test_logprobs_follow_a_gemma2_style_final_logit_softcapping():
    """The decoder + output layer path applies the model's softcapping, as its forward does: equal to
    log_softmax(model(...).logits) in float64, and the set-up probe passes; without it the gap is large."""
    from posttrain.core.logprobs import LogitProcessing, check_against_forward

    model = _gemma2_like(softcap=2.0)
    ids, attention, loss_mask = _batch(length=10)
    ours = PolicyLogProbs(model)(ids, attention, loss_mask)
    logits = model(input_ids=ids, attention_mask=attention).logits
    direct = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * loss_mask[:, 1:]
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-10)
    assert check_against_forward(PolicyLogProbs(model), torch.device("cpu")) < 1e-6  # compared in float32
    uncapped = PolicyLogProbs(model)
    uncapped.processing = LogitProcessing()
    with pytest.raises(ValueError, match="post-processes the logits"):
        check_against_forward(uncapped, torch.device("cpu"))
