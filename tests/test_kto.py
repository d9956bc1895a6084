"""KTO (Ethayarajh et al. 2024): TRL's unpaired format read as is, the mismatched KL completions rotated as
TRL rotates them, the loss equal to TRL 1.16's `KTOTrainer._compute_loss` in float64 (with its KL term),
a worked example by hand, clear errors for the wrong kind of data, and training on the tiny task."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from helpers import recipe_from, tiny_recipe
from posttrain.config import LossTerm
from posttrain.core import PolicyLogProbs, StepCounts, backward_through_coefficients
from posttrain.errors import DataError
from posttrain.losses import PairLossInputs, build_loss

F64 = torch.float64
ROWS = {"prompt": ["The sky is", "Two plus two is", "Water boils at", "My favourite colour", "Cats like"],
        "completion": [" blue.", " five, surely", " one hundred degrees.", " is a secret", " fish"],
        "label": [True, False, True, False, True]}
OFFSET = torch.tensor([1.5, -2.0, 0.75, -0.25, 0.5], dtype=F64)  # reference sums = policy sums + OFFSET
KL_OFFSET = torch.tensor([-1.0, -0.5, -2.0, 0.25, -0.75], dtype=F64)


def _kto(**params):
    return build_loss([LossTerm(name="kto", params=params)])


def _sum_on_first_token(sums, mask):
    per_token = torch.zeros_like(mask)
    per_token[torch.arange(mask.shape[0]), mask.argmax(dim=1)] = sums
    return per_token


@pytest.mark.parametrize("loss_type, beta, weights", [("kto", 0.1, (1.0, 1.0)), ("kto", 0.5, (1.33, 0.75)),
                                                     ("apo_zero_unpaired", 0.2, (1.0, 1.0))])
def test_kto_equals_trl_kto_trainer(tokenizer, tmp_path, monkeypatch, loss_type, beta, weights):
    pytest.importorskip("trl", minversion="1.16")
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    monkeypatch.setenv("TQDM_DISABLE", "1")
    n = len(ROWS["prompt"])
    model = make_tiny_model(len(tokenizer), seed=0, dtype=F64)
    args = KTOConfig(output_dir=str(tmp_path / "kto"), beta=beta, loss_type=loss_type, desirable_weight=weights[0],
                     undesirable_weight=weights[1], precompute_ref_log_probs=True, per_device_train_batch_size=n,
                     report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                     max_length=None, save_strategy="no", logging_strategy="no", seed=0)
    try:
        trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        kl = "KL_input_ids" in batch
        assert kl == (loss_type == "kto")  # TRL builds mismatched completions only for the KL term
        model.eval()
        with torch.no_grad():
            ours = PolicyLogProbs(model)(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ours_kl = PolicyLogProbs(model)(batch["KL_input_ids"], batch["KL_attention_mask"],
                                            batch["KL_completion_mask"]) if kl else None
        model.train()
        mask = batch["completion_mask"][:, 1:].to(F64)
        kl_mask = batch["KL_completion_mask"][:, 1:].to(F64) if kl else mask
        sums, kl_sums = (ours * mask).sum(-1), ((ours_kl if kl else ours) * kl_mask).sum(-1)
        batch["ref_logps"] = sums + OFFSET
        if kl:
            batch["ref_KL_logps"] = kl_sums + KL_OFFSET
        leaf = ours.clone().requires_grad_(True)

        def inject(module, a, kwargs, output):  # TRL's fused head, replaced by posttrain's values on the same ids
            is_kl = kl and torch.equal(kwargs["input_ids"], batch["KL_input_ids"])
            expected = ours_kl if is_kl else ours
            torch.testing.assert_close(output.log_probs.to(F64), expected, rtol=1e-5, atol=1e-5)
            output.log_probs = expected if is_kl else leaf
            return output

        handle = model.register_forward_hook(inject, with_kwargs=True)
        try:
            trl_loss = trainer._compute_loss(model, batch, return_outputs=False)
        finally:
            handle.remove()
        trl_loss.backward()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    # posttrain: the row's completion as the "chosen" side, the mismatched one (TRL's KL sequence) as "rejected".
    width = max(mask.shape[1], kl_mask.shape[1])
    pad = lambda x: F.pad(x, (0, width - x.shape[1]))  # noqa: E731
    chosen = pad(ours.clone()).requires_grad_(True)
    rejected, chosen_mask, rejected_mask = pad(ours_kl if kl else ours), pad(mask), pad(kl_mask)
    inputs = PairLossInputs(chosen_logps=chosen, rejected_logps=rejected, chosen_mask=chosen_mask,
                            rejected_mask=rejected_mask, pair_weight=torch.ones(n, dtype=F64),
                            ref_chosen_logps=_sum_on_first_token(sums + OFFSET, chosen_mask),
                            ref_rejected_logps=_sum_on_first_token(kl_sums + (KL_OFFSET if kl else OFFSET),
                                                                   rejected_mask),
                            extras={"kto_desirable": batch["label"].to(F64)})
    plugin = _kto(beta=beta, loss_type=loss_type, desirable_weight=weights[0], undesirable_weight=weights[1])
    out, _ = backward_through_coefficients(lambda leaves: plugin.step_loss(replace(inputs, **leaves),
                                                                           StepCounts(examples=n, tokens=1.0)),
                                           {"chosen_logps": chosen, "rejected_logps": rejected},
                                           lambda surrogate: surrogate.backward())
    assert math.isclose(out.loss.item(), trl_loss.item(), rel_tol=1e-9), (out.loss.item(), trl_loss.item())
    torch.testing.assert_close(chosen.grad[:, :mask.shape[1]], leaf.grad * mask, rtol=1e-9, atol=0.0)
    if kl:
        z0 = max(0.0, float((-KL_OFFSET).mean()))
        assert out.metrics["kl"][0].item() == pytest.approx(z0, rel=1e-12) and z0 > 0


def test_kto_worked_example_by_hand():
    """Two rows, beta 1: rho = (0.5, -1.0) (desirable, undesirable); mismatched log-ratios (0.3, 0.1) give
    z0 = 0.2; L = [(1 - sigmoid(0.5 - 0.2)) + (1 - sigmoid(0.2 + 1.0))] / 2."""
    ones = torch.ones(2, 1, dtype=F64)
    inputs = PairLossInputs(chosen_logps=torch.tensor([[0.5], [-1.0]], dtype=F64),
                            rejected_logps=torch.tensor([[0.3], [0.1]], dtype=F64), chosen_mask=ones,
                            rejected_mask=ones.clone(), pair_weight=torch.ones(2, dtype=F64),
                            ref_chosen_logps=torch.zeros(2, 1, dtype=F64),
                            ref_rejected_logps=torch.zeros(2, 1, dtype=F64),
                            extras={"kto_desirable": torch.tensor([1.0, 0.0], dtype=F64)})
    out = _kto(beta=1.0).step_loss(inputs, StepCounts(examples=2.0, tokens=2.0))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = ((1 - sig(0.3)) + (1 - sig(1.2))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["kl"].mean().item() == pytest.approx(0.2, rel=1e-12)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_reads_trls_unpaired_format_and_rotates_the_mismatched_completions(tiny_model_dir, tmp_path):
    from posttrain.trainer import Trainer

    rows = [{"prompt": p, "completion": c, "label": lab} for p, c, lab in zip(*ROWS.values())]
    data = _write(tmp_path / "kto.jsonl", rows)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": "kto", "params": {"kl_chunk": 2}},
                      data={"train": {"path": str(data)}, "heldout": None},
                      train={"max_steps": 1, "batch_size": 5, "micro_batch_size": 5, "shuffle": False},
                      logging={"report_to": ["jsonl"], "progress_bar": False})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    pairs = trainer.train_pairs
    assert [p.extras["kto_desirable"] for p in pairs] == [1.0, 0.0, 1.0, 0.0, 1.0]
    # chunks of 2 (TRL's rotation by one within each batch): (0 1) (2 3) (4)
    assert [p.rejected_ids for p in pairs] == [pairs[1].chosen_ids, pairs[0].chosen_ids, pairs[3].chosen_ids,
                                               pairs[2].chosen_ids, pairs[4].chosen_ids]
    record = trainer.train_step(0)
    assert math.isfinite(record["loss"]) and record["kl"] >= 0


def test_kto_data_for_a_pair_loss_and_pairs_for_kto_are_clear_errors(tiny_model_dir, tmp_path):
    from posttrain.trainer import Trainer

    kto_rows = _write(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": " there", "label": True}] * 3)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"train": {"path": str(kto_rows)}, "heldout": None})
    with pytest.raises(DataError, match=r"kto.jsonl, row 1: unpaired KTO data .* loss 'dpo' trains on preference "
                                        r"pairs .*`loss: kto`"):
        Trainer(recipe_from(raw)).setup()
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run2", loss={"name": "kto"}, data={"heldout": None})
    with pytest.raises(DataError, match=r"builtin:tiny/train, row \d+: preference pairs .* loss 'kto' trains on "
                                        r"unpaired KTO data .*a pair loss"):
        Trainer(recipe_from(raw)).setup()
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "Hi", "completion": " there", "label": "yes"}])
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run3", loss={"name": "kto"},
                      data={"train": {"path": str(bad)}, "heldout": None})
    with pytest.raises(DataError, match=r"bad.jsonl, row 1.*label.*true \(desirable\) or false"):
        Trainer(recipe_from(raw)).setup()


def test_kto_trains_the_tiny_task(tiny_model_dir, tmp_path):
    """The tiny task's pairs unpaired as TRL unpairs preference data (chosen desirable, rejected undesirable):
    held-out ranking accuracy (on the pairs) rises by the margin the pair losses' tests ask for."""
    from posttrain.data.tasks import builtin_rows
    from posttrain.trainer import Trainer

    rows = []
    for row in builtin_rows("tiny", "train", 128, 0):
        rows += [{"prompt": row.prompt, "completion": row.chosen, "label": True},
                 {"prompt": row.prompt, "completion": row.rejected, "label": False}]
    data = _write(tmp_path / "tiny_kto.jsonl", rows)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": "kto", "params": {"beta": 0.1}},
                      data={"train": {"path": str(data)}},
                      train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 24, "lr": 1e-2},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    summary = Trainer(recipe_from(raw)).train()
    before, after = summary["heldout_before"]["ranking_accuracy"], summary["heldout_after"]["ranking_accuracy"]
    assert after >= before + 0.25 and after >= 0.9, (before, after)
