"""Memory: a micro-batch token limit checked before training, saying what would fit, and an
out-of-memory error in a step reported with that micro-batch's size and rows."""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers import recipe_from, tiny_recipe, write_varied_pairs
from posttrain import cli
from posttrain.steps import pairs as pair_step
from posttrain.errors import PosttrainError
from posttrain.trainer import Trainer



def _raw(tiny_model_dir, tmp_path, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_varied_pairs(tmp_path / "varied.jsonl", n=12)
    return tiny_recipe(tiny_model_dir, tmp_path / "run", data={"train": {"path": str(data)}, "heldout": None},
                       train={"batch_size": 4, "micro_batch_size": 4, "max_steps": 3,
                              "share_prompt": False, "packing": False, **train},  # the guard's bound: plain rows
                       logging={"progress_bar": False, "report_to": ["jsonl"]},
                       reference={"precompute": False})  # the guard bounds training micro-batches, not no-grad scoring


def _largest_collated_batch(raw, monkeypatch) -> int:
    """The largest input_ids tensor the trainer really builds over the run."""
    sizes = []
    real = pair_step.build_pair_rows

    def recording(*args, **kwargs):
        rows = real(*args, **kwargs)
        sizes.append(rows.input_ids.numel())
        return rows

    monkeypatch.setattr(pair_step, "build_pair_rows", recording)
    Trainer(recipe_from(raw)).train()
    return max(sizes)


def test_the_token_limit_is_checked_before_training_and_names_what_fits(tiny_model_dir, tmp_path, monkeypatch,
                                                                       cli_stderr):
    largest = _largest_collated_batch(_raw(tiny_model_dir, tmp_path / "measured"), monkeypatch)
    limit = largest - 1
    raw = _raw(tiny_model_dir, tmp_path, max_tokens_per_micro_batch=limit)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(recipe)]) == 2
    err = cli_stderr.readouterr().err
    [message] = [line for line in err.splitlines() if line.startswith("posttrain error")]  # one paragraph
    assert message.startswith("posttrain error: the largest micro-batch") and "Traceback" not in err
    assert f"= {largest} tokens) exceeds train.max_tokens_per_micro_batch={limit}" in message
    assert not (tmp_path / "run").exists()  # nothing written
    suggested = int(message.split("train.micro_batch_size: ")[1].split()[0])
    assert 1 <= suggested < 4
    fitting = _raw(tiny_model_dir, tmp_path / "fits", max_tokens_per_micro_batch=limit, micro_batch_size=suggested)
    Trainer(recipe_from(fitting)).train()  # the suggestion does fit
    assert (tmp_path / "fits" / "run" / "final").is_dir()


def test_out_of_memory_in_a_step_names_the_micro_batch(tiny_model_dir, tmp_path):
    trainer = Trainer(recipe_from(_raw(tiny_model_dir, tmp_path, shuffle=False)))
    trainer.setup()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated: tried to allocate 20.00 GiB")

    trainer.model.forward = out_of_memory
    with pytest.raises(PosttrainError) as info:
        trainer.train_step(0)
    pairs = trainer.train_pairs[:4]
    length = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    message = str(info.value)
    assert message.startswith("step 1: out of memory in a micro-batch of 4 pairs")
    assert f"8 sequences padded to {length} tokens = {8 * length} tokens" in message
    assert "varied.jsonl row 1" in message and "varied.jsonl row 4" in message
    assert "train.micro_batch_size" in message and "train.max_tokens_per_micro_batch" in message
