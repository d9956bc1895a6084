"""Where reference log-probs come from: adapters off, a frozen copy of a starting adapter, a
separate model, or a precomputed cache; and the options that must not change the numbers."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import recipe_from, tiny_recipe
from posttrain.trainer import Trainer


def _first_steps(raw, steps=2):
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    records = [trainer.train_step(s) for s in range(steps)]
    return trainer, records


def _f64(tiny_model_dir, tmp_path, name, **sections):
    base = {"data": {"heldout": None}, "train": {"batch_size": 8, "micro_batch_size": 4, "lr": 5e-2},
            "model": {"dtype": "float64"}, "logging": {"progress_bar": False, "report_to": ["jsonl"]}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_recipe(tiny_model_dir, tmp_path / name, **base)


def test_adapter_off_reference_starts_at_log2_and_moves_away(tiny_model_dir, tmp_path):
    trainer, records = _first_steps(_f64(tiny_model_dir, tmp_path, "a"), steps=3)
    assert trainer.reference.kind == "adapter_off"
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-12)  # LoRA starts as the identity
    assert records[0]["rewards/margins"] == 0
    assert records[2]["rewards/margins"] != 0


def test_starting_adapter_is_the_frozen_reference(tiny_model_dir, tmp_path):
    first = Trainer(recipe_from(tiny_recipe(tiny_model_dir, tmp_path / "first",
                                            train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "lr": 5e-2},
                                            logging={"progress_bar": False, "report_to": ["jsonl"]})))
    first.train()
    raw = _f64(tiny_model_dir, tmp_path, "second", lora={"init_adapter": str(tmp_path / "first" / "final")})
    trainer, records = _first_steps(raw, steps=3)
    assert trainer.reference.kind == "reference_adapter"
    # The policy starts as the adapter, and so does the reference: the loss starts at log 2 ...
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-9)
    # ... although the adapter differs from the base model (so adapters-off would not give log 2).
    assert any(p.abs().max() > 0 for n, p in trainer.peft_model.named_parameters() if "lora_B.reference" in n)
    trainable = [n for n, p in trainer.peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    reference = {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters() if ".reference." in n}
    assert reference
    trainer.train_step(3)
    for n, p in trainer.peft_model.named_parameters():
        if n in reference:
            assert torch.equal(p, reference[n]), n
    assert records[2]["rewards/margins"] != 0


def test_separate_reference_model_equals_adapter_off_for_the_same_weights(tiny_model_dir, tmp_path):
    _, adapter_off = _first_steps(_f64(tiny_model_dir, tmp_path, "a"), steps=3)
    trainer, separate = _first_steps(_f64(tiny_model_dir, tmp_path, "b", reference={
        "kind": "separate", "name_or_path": str(tiny_model_dir)}), steps=3)
    assert trainer.reference.kind == "separate"
    for a, b in zip(adapter_off, separate):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-10)


def test_precomputed_reference_gives_the_same_trajectory(tiny_model_dir, tmp_path):
    live_trainer, live = _first_steps(_f64(tiny_model_dir, tmp_path, "a", reference={"precompute": False}), steps=3)
    trainer, cached = _first_steps(_f64(tiny_model_dir, tmp_path, "b", reference={"precompute": True}), steps=3)
    assert live_trainer.step.reference_cache is None
    assert trainer.step.reference_cache is not None and len(trainer.step.reference_cache) == len(trainer.train_pairs)
    for a, b in zip(live, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-10)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-8, abs=1e-14)


def test_precompute_auto_precomputes_when_the_plan_visits_every_pair(tiny_model_dir, tmp_path, capsys):
    """auto: precomputed for a full epoch on one process (256 visits of 256 pairs), live for 8 steps of 8 pairs
    (64 visits), where precomputing would score 4 times the pairs the run trains on."""
    epoch, _ = _first_steps(_f64(tiny_model_dir, tmp_path, "a"), steps=1)
    assert epoch.recipe.reference.precompute == "auto" and epoch.plan.visits() == 256
    assert epoch.step.reference_cache is not None
    assert "reference log-probs precomputed once (reference.precompute auto: 256 pair visits per process, 256 " \
           "training pairs)" in capsys.readouterr().out
    short, _ = _first_steps(_f64(tiny_model_dir, tmp_path, "b", train={"max_steps": 8}), steps=1)
    assert short.plan.visits() == 64 and short.step.reference_cache is None
    assert "reference log-probs computed live (reference.precompute auto: 64 pair visits" in capsys.readouterr().out


def test_gradient_checkpointing_and_bf16_options(tiny_model_dir, tmp_path):
    _, plain = _first_steps(_f64(tiny_model_dir, tmp_path, "a"), steps=2)
    _, checkpointed = _first_steps(_f64(tiny_model_dir, tmp_path, "b", model={"gradient_checkpointing": True}), steps=2)
    for a, b in zip(plain, checkpointed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-10)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-8)
    _, bf16 = _first_steps(_f64(tiny_model_dir, tmp_path, "c", model={"dtype": "float32"}, train={"bf16": True}),
                           steps=2)
    assert math.isfinite(bf16[1]["loss"]) and bf16[0]["loss"] == pytest.approx(math.log(2), rel=1e-2)
