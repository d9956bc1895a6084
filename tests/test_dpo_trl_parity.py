"""posttrain's DPO loss equals TRL 1.16's `DPOTrainer._compute_loss` (spec section 1), in float64.

The TRL side is a real `DPOTrainer` on a tiny float64 Llama with `precompute_ref_log_probs=True`: its
own preprocessing tokenises the pairs, its own collator builds the batch, and its `_compute_loss`
reads the reference sums from the batch. Both sides get identical per-token log-probs: posttrain's
`PolicyLogProbs` values on TRL's token ids, handed to TRL through a forward hook on the model.
They have to be injected because TRL's fused LM head computes the log-softmax in float32 even for a
float64 model, so its own values agree with a float64 forward only to about 1e-7. The test checks
that agreement too, which shows that both sides score the same tokens at the same positions. The
comparison covers the loss and its gradient w.r.t. the per-token log-probs (rtol 1e-9; posttrain's
obtained as the trainer does, through `backward_through_coefficients`) and TRL's logged metrics (rewards,
margins, accuracies, summed log-probs). The file also checks the spec's worked example.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from posttrain.config import LossTerm
from posttrain.core import PolicyLogProbs, StepCounts, backward_through_coefficients
from posttrain.losses import PairLossInputs, build_loss

RTOL = 1e-9
BETA = 0.1

PAIRS = {  # lengths differ so that chosen and rejected rows both get right padding
    "prompt": ["The sky is", "Two plus two is", "Water boils at", "My favourite colour"],
    "chosen": [" blue.", " four.", " one hundred degrees Celsius at sea level.", " is green"],
    "rejected": [" green and purple.", " five", " zero.", " is probably a secret I keep"],
}
# Reference sums are the policy sums shifted by these known offsets, so every implicit reward is known
# in closed form: r_w = -beta * OFFSET_CHOSEN, r_l = -beta * OFFSET_REJECTED (accuracies mixed).
OFFSET_CHOSEN = torch.tensor([1.5, -2.0, 0.75, -0.25], dtype=torch.float64)
OFFSET_REJECTED = torch.tensor([-0.5, 1.0, 2.25, 0.5], dtype=torch.float64)
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]


def _dpo(loss_type: str, beta: float = BETA, **extra):
    return build_loss([LossTerm(name="dpo", weight=1.0, params={"beta": beta, "loss_type": loss_type, **extra})])


def _pair_inputs(chosen, rejected, chosen_mask, rejected_mask, ref_chosen, ref_rejected):
    b = chosen.shape[0]
    return PairLossInputs(
        chosen_logps=chosen, rejected_logps=rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
        pair_weight=torch.ones(b, dtype=chosen.dtype), ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)


def _counts(inputs: PairLossInputs) -> StepCounts:
    """The step is this one micro-batch: its pairs, and its chosen tokens."""
    return StepCounts(examples=float(inputs.pair_weight.sum()), tokens=float(inputs.chosen_mask.sum()))


def _step_loss(plugin, inputs: PairLossInputs):
    return plugin.step_loss(inputs, _counts(inputs))


def _through_coefficients(plugin, inputs: PairLossInputs):
    """The trainer's gradient path: coefficients c = -dL/dlp on detached log-probs, then `-sum c lp` backpropagated
    into `inputs.chosen_logps` / `inputs.rejected_logps` (leaves here). Returns the (detached) step loss."""
    out, _ = backward_through_coefficients(
        lambda leaves: plugin.step_loss(replace(inputs, **leaves), _counts(inputs)),
        {"chosen_logps": inputs.chosen_logps, "rejected_logps": inputs.rejected_logps},
        lambda surrogate: surrogate.backward())
    return out


def _sum_on_first_token(sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token reference values whose masked sum is `sums` (all of it on the first completion token)."""
    first = mask.argmax(dim=1)
    per_token = torch.zeros_like(mask)
    per_token[torch.arange(mask.shape[0]), first] = sums
    assert torch.equal((per_token * mask).sum(-1), sums)
    return per_token


@pytest.fixture
def trl_trainer(request, tokenizer, tmp_path, monkeypatch):
    """A real TRL DPOTrainer (precomputed reference log-probs) on a tiny float64 model."""
    pytest.importorskip("trl", minversion="1.16")
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    monkeypatch.setenv("TQDM_DISABLE", "1")  # TRL's precompute loop reads it at call time
    loss_type, beta, extra = request.param
    model = make_tiny_model(len(tokenizer), seed=0, dtype=torch.float64)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, beta=beta, **extra,
                     precompute_ref_log_probs=True, report_to="none", use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=len(PAIRS["prompt"]),
                     max_length=None, save_strategy="no", logging_strategy="no", seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
    yield trainer
    # Trainer's Accelerator registers process-wide singletons; do not leak them into other tests.
    AcceleratorState._reset_state(reset_partial_state=True)


# TRL 1.16's DPO loss types, each at two settings (TRL's parameter names, which posttrain's `dpo` shares).
TRL_SETTINGS = [(loss_type, beta, {}) for loss_type in ("sigmoid", "ipo", "sigmoid_norm", "hinge", "nca_pair",
                                                         "bco_pair", "sppo_hard", "apo_zero", "apo_down")
                for beta in (BETA, 0.5)]
TRL_SETTINGS += [("exo_pair", 0.1, {"label_smoothing": 1e-3}), ("exo_pair", 0.5, {"label_smoothing": 0.2}),
                 ("aot", 0.1, {}), ("aot", 0.5, {"label_smoothing": 0.2}),
                 ("aot_unpaired", 0.1, {}), ("aot_unpaired", 0.5, {"label_smoothing": 0.2}),
                 ("discopop", 0.1, {}), ("discopop", 0.5, {"discopop_tau": 0.5})]


@pytest.mark.parametrize("trl_trainer", TRL_SETTINGS, indirect=True, ids=lambda s: f"{s[0]}-beta{s[1]}-{s[2]}")
def test_dpo_loss_and_metrics_equal_trl_dpo_trainer(trl_trainer):
    trainer = trl_trainer
    loss_type, beta = trainer.loss_types[0], trainer.beta
    extra = {"label_smoothing": trainer.label_smoothing, "discopop_tau": trainer.args.discopop_tau}
    assert trainer.loss_types == [loss_type] and trainer.ld_alpha is None
    assert trainer.precompute_ref_logps and trainer.ref_model is None  # no reference model: must read the batch
    model = trainer.model
    assert next(model.parameters()).dtype == torch.float64

    # TRL's own tokenisation and collation (EOS appended to the completions, right padding).
    dataset = trainer.train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    n_pairs = len(dataset)
    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert input_ids.shape[0] == 2 * n_pairs  # [chosen..., rejected...]
    assert (attention_mask == 0).any(dim=1)[:n_pairs].any() and (attention_mask == 0).any(dim=1)[n_pairs:].any()

    # posttrain's per-token log-probs on exactly these token ids; loss mask = TRL's completion mask.
    model.eval()  # dropout is off in the tiny model anyway; _compute_loss below runs in train mode as usual
    with torch.no_grad():
        ours = PolicyLogProbs(model)(input_ids, attention_mask, completion_mask)
    model.train()
    assert ours.dtype == torch.float64
    mask = completion_mask[:, 1:].to(torch.float64)  # label position t -> entry t-1
    assert (ours[mask == 0] == 0).all() and (ours[mask == 1] < 0).all()
    policy_sums = (ours * mask).sum(-1)

    # TRL's precomputed reference sums (the untouched initial model) agree with posttrain's up to TRL's float32
    # log-softmax: both sides score the same tokens.
    trl_ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(torch.float64)
    torch.testing.assert_close(trl_ref, policy_sums, rtol=1e-5, atol=1e-5)

    # Known reference sums, fed to TRL through the precomputed path.
    ref_chosen = policy_sums[:n_pairs] + OFFSET_CHOSEN
    ref_rejected = policy_sums[n_pairs:] + OFFSET_REJECTED
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen.clone(), ref_rejected.clone()

    seen = {}

    def inject(module, args, kwargs, output):
        # TRL's fused head: float32 log-softmax, zeros off the completion; same positions as posttrain's.
        assert kwargs.get("fused_lm_head") is True
        assert output.log_probs.shape == ours.shape
        assert torch.equal(output.log_probs != 0, ours != 0)
        torch.testing.assert_close(output.log_probs.to(torch.float64), ours, rtol=1e-5, atol=1e-5)
        seen["called"] = True
        output.log_probs = trl_leaf
        return output

    trl_leaf = ours.clone().requires_grad_(True)  # TRL's loss gradient w.r.t. the per-token log-probs lands here
    handle = model.register_forward_hook(inject, with_kwargs=True)
    try:
        trainer._metrics["train"].clear()
        trl_loss = trainer._compute_loss(model, batch, return_outputs=False)
    finally:
        handle.remove()
    assert seen.get("called"), "TRL's forward was not called through the hooked model"
    trl_metrics = {name: trainer._metrics["train"][name] for name in METRICS}
    assert all(len(values) == 1 for values in trl_metrics.values()), trl_metrics
    trl_metrics = {name: values[0] for name, values in trl_metrics.items()}
    assert trl_loss.dtype == torch.float64

    # posttrain on the same per-token values; the reference sums sit on the first completion token.
    chosen_mask, rejected_mask = mask[:n_pairs], mask[n_pairs:]
    chosen_leaf, rejected_leaf = (x.clone().requires_grad_(True) for x in (ours[:n_pairs], ours[n_pairs:]))
    out = _through_coefficients(_dpo(loss_type, beta, **extra), _pair_inputs(chosen_leaf, rejected_leaf, chosen_mask, rejected_mask,
                                                              _sum_on_first_token(ref_chosen, chosen_mask),
                                                              _sum_on_first_token(ref_rejected, rejected_mask)))

    assert out.loss.dtype == torch.float64
    # TRL holds exo_pair's eps as a float32 tensor, so its log(1 - eps) and log(eps) are float32 constants; the
    # float64 closed form below pins posttrain's value to 1e-9.
    rtol = 1e-6 if loss_type == "exo_pair" else RTOL
    assert math.isclose(out.loss.item(), trl_loss.item(), rel_tol=rtol, abs_tol=0.0), (out.loss.item(),
                                                                                          trl_loss.item())
    for name in METRICS:  # TRL logs the batch mean of each per-pair value
        ours_mean = out.metrics[name].mean().item()
        assert math.isclose(ours_mean, trl_metrics[name], rel_tol=RTOL, abs_tol=0.0), (name, ours_mean,
                                                                                        trl_metrics[name])

    # Same gradient w.r.t. every completion token's log-prob (posttrain's comes from the unified-core surrogate
    # -sum c lp above, not from autograd of the loss value). TRL sums whole rows, so only the completion positions
    # are comparable; its fused head has no gradient elsewhere. posttrain's is zero there.
    trl_loss.backward()
    ours_grad = torch.cat([chosen_leaf.grad, rejected_leaf.grad])
    assert (ours_grad[mask == 0] == 0).all() and (ours_grad[mask == 1] != 0).any()  # hinge: 0 where relu is
    torch.testing.assert_close(ours_grad, trl_leaf.grad * mask, rtol=rtol, atol=0.0)

    # Both equal the closed form of the known offsets (so the injected values really reached TRL).
    r_w, r_l = -beta * OFFSET_CHOSEN, -beta * OFFSET_REJECTED
    torch.testing.assert_close(out.metrics["rewards/chosen"], r_w, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(out.metrics["rewards/rejected"], r_l, rtol=RTOL, atol=1e-12)
    assert out.metrics["rewards/accuracies"].tolist() == (r_w > r_l).double().tolist()
    assert 0 < trl_metrics["rewards/accuracies"] < 1
    closed_form = {"sigmoid": lambda: -F.logsigmoid(r_w - r_l).mean(),
                   "ipo": lambda: ((-OFFSET_CHOSEN / n_w + OFFSET_REJECTED / n_l - 1 / (2 * beta)) ** 2).mean(),
                   "hinge": lambda: torch.relu(1 - (r_w - r_l)).mean(),
                   "bco_pair": lambda: (-F.logsigmoid(r_w) - F.logsigmoid(-r_l)).mean(),
                   "exo_pair": lambda: (torch.sigmoid(r_w - r_l) * (F.logsigmoid(r_w - r_l) - math.log1p(-eps))
                                        + torch.sigmoid(r_l - r_w) * (F.logsigmoid(r_l - r_w) - math.log(eps))).mean()}
    eps = trainer.label_smoothing
    n_w, n_l = completion_mask[:n_pairs].sum(-1), completion_mask[n_pairs:].sum(-1)
    if loss_type in closed_form:
        expected = closed_form[loss_type]()
        assert math.isclose(out.loss.item(), expected.item(), rel_tol=RTOL), (out.loss.item(), expected.item())
        assert math.isclose(trl_loss.item(), expected.item(), rel_tol=rtol), (trl_loss.item(), expected.item())


# Spec section 1, worked example.
WORKED = dict(chosen=[-2.0, -3.0, -5.0], rejected=[-4.0, -4.0, -4.0], ref_chosen=[-2.5, -3.5, -5.0],
              ref_rejected=[-4.0, -3.5, -4.0])


def _worked_inputs(rows=1):
    t = {k: torch.tensor([v] * rows, dtype=torch.float64) for k, v in WORKED.items()}
    ones = torch.ones(rows, 3, dtype=torch.float64)
    return _pair_inputs(t["chosen"], t["rejected"], ones, ones.clone(), t["ref_chosen"], t["ref_rejected"])


@pytest.mark.parametrize("params, expected", [
    ({"loss_type": "sigmoid"}, 0.6209570477895321),
    ({"loss_type": "sigmoid", "label_smoothing": 0.1}, 0.6359570477895321),
    ({"loss_type": "ipo"}, 20.25),
])
def test_spec_worked_example(params, expected):
    out = _step_loss(_dpo(**params), _worked_inputs())
    assert math.isclose(out.loss.item(), expected, rel_tol=RTOL)
    assert math.isclose(out.metrics["rewards/chosen"].item(), 0.1, rel_tol=RTOL)
    assert math.isclose(out.metrics["rewards/rejected"].item(), -0.05, rel_tol=RTOL)
    assert math.isclose(out.metrics["rewards/margins"].item(), 0.15, rel_tol=RTOL)
    assert out.metrics["rewards/accuracies"].item() == 1.0
    assert out.metrics["logps/chosen"].item() == -10.0 and out.metrics["logps/rejected"].item() == -12.0


def test_spec_worked_example_batch_mean():
    # Second pair: h = -2.0, obtained by lowering the policy's chosen log-prob by 3.5 on one token.
    inputs = _worked_inputs(rows=2)
    inputs.chosen_logps[1, 0] -= 3.5
    out = _step_loss(_dpo("sigmoid"), inputs)
    torch.testing.assert_close(out.metrics["rewards/margins"], torch.tensor([0.15, -0.2], dtype=torch.float64),
                               rtol=RTOL, atol=1e-15)
    assert math.isclose(out.loss.item(), 0.709547958585562, rel_tol=RTOL)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_sorts_among_the_real_pairs_only(loss_type):
    """A short step's zero-weight filler rows take no place in AOT's sort: the loss of a micro-batch with a
    filler equals the loss of its real pairs alone (TRL sorts its whole per-device batch; it has no fillers)."""
    generator = torch.Generator().manual_seed(3)
    values = {k: -torch.rand(4, 5, generator=generator, dtype=torch.float64) for k in ("c", "r", "rc", "rr")}
    ones = torch.ones(4, 5, dtype=torch.float64)
    full = _pair_inputs(values["c"], values["r"], ones, ones.clone(), values["rc"], values["rr"])
    with_filler = replace(full, pair_weight=torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    real = _pair_inputs(*(values[k][:3] for k in ("c", "r")), ones[:3], ones[:3].clone(),
                        *(values[k][:3] for k in ("rc", "rr")))
    plugin = _dpo(loss_type, 0.5)
    filled = _step_loss(plugin, with_filler).loss
    alone = plugin.step_loss(real, StepCounts(examples=3.0, tokens=15.0)).loss
    assert math.isclose(filled.item(), alone.item(), rel_tol=RTOL)
