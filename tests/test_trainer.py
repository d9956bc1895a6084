"""The trainer: global normalisation under accumulation, training that improves held-out ranking
accuracy, checkpoints that resume exactly after SIGKILL, and the run record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import recipe_from, tiny_recipe, write_varied_pairs
from posttrain import cli
from posttrain.plan import StepPlan, shard_for_rank
from posttrain.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _step_gradients(recipe) -> dict[str, torch.Tensor]:
    """Gradients of the first optimiser step, captured just before the optimiser uses them."""
    trainer = Trainer(recipe)
    trainer.setup()
    captured = {}
    original = trainer.optimizer.step

    def capture(*args, **kwargs):
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                captured[name] = p.grad.detach().clone()
        return original(*args, **kwargs)

    trainer.optimizer.step = capture
    record = trainer.train_step(0)
    return captured, record, trainer


@pytest.mark.parametrize("loss, batch, micro_sizes", [
    ({"name": "dpo", "params": {"beta": 0.5}}, 5, (5, 2)),  # uneven last micro-batch: 2 + 2 + 1
    ({"name": "sft"}, 4, (4, 1)),  # token-level NLL over responses of very different lengths
])
def test_accumulation_does_not_change_the_gradient(tiny_model_dir, tmp_path, loss, batch, micro_sizes):
    data = write_varied_pairs(tmp_path / "varied.jsonl")
    results = []
    for micro in micro_sizes:
        raw = tiny_recipe(tiny_model_dir, tmp_path / f"run{micro}", loss=loss,
                          data={"train": {"path": str(data)}, "heldout": None},
                          train={"batch_size": batch, "micro_batch_size": micro, "shuffle": False,
                                 "max_grad_norm": None},
                          model={"dtype": "float64"})
        results.append(_step_gradients(recipe_from(raw)))
    (g_one, rec_one, trainer), (g_acc, rec_acc, _) = results
    assert g_one.keys() == g_acc.keys() and g_one
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-6, atol=1e-12)
    assert rec_one["loss"] == pytest.approx(rec_acc["loss"], rel=1e-9)
    # Averaging per micro-batch would differ here: the step's responses differ widely in length.
    lengths = [len(p.chosen_ids) for p in trainer.train_pairs[:batch]]
    assert max(lengths) >= 4 * min(lengths), lengths


def test_shards_cover_every_pair_once_with_zero_weight_fillers():
    indices = list(range(7))
    shards = [shard_for_rank(indices, r, 2, 3) for r in range(2)]
    flat = [i for s in shards for mb in s for i in mb if i is not None]
    assert sorted(flat) == indices
    assert [len(s) for s in shards] == [2, 2]  # the same number of micro-batches on every process
    assert sum(i is None for s in shards for mb in s for i in mb) == 1
    # A short step is padded to the full step's number of micro-batches with one-row fillers.
    assert shard_for_rank([5], 1, 2, 2, micro_batches=2) == [[None], [None]]
    assert shard_for_rank([5], 0, 2, 2, micro_batches=2) == [[5], [None]]


def test_plan_visits_count_every_step_of_every_epoch():
    for plan in (StepPlan(10, 4, 3, 0, True), StepPlan(10, 4, 3, 0, True, max_steps=4),
                 StepPlan(10, 4, 1, 0, False, max_steps=2), StepPlan(10, 4, 1, 0, True, max_steps=7)):
        assert plan.visits() == sum(len(plan.indices(s)) for s in range(plan.total_steps))
    assert [StepPlan(10, 4, 3, 0, True).visits(), StepPlan(10, 4, 1, 0, True, max_steps=4).visits()] == [30, 14]


def test_a_short_last_step_still_updates_and_leaves_no_gradient_behind(tiny_model_dir, tmp_path):
    """5 pairs in steps of 4 with micro-batches of 2: the one-pair last step of the epoch has one real
    micro-batch where a full step has two; accelerate counts micro-batches, so without filler
    micro-batches that step would not update and its gradient would leak into the next one."""
    data = write_varied_pairs(tmp_path / "five.jsonl", n=5)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"train": {"path": str(data)}, "heldout": None},
                      train={"batch_size": 4, "micro_batch_size": 2, "shuffle": False, "optimizer": "sgd", "lr": 1.0})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    trainer.train_step(0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train_step(1)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_dpo_trains_the_tiny_task_and_records_the_run(tiny_model_dir, tmp_path):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", train={"batch_size": 16, "micro_batch_size": 16,
                                                                "max_steps": 24, "lr": 2e-2})
    summary = Trainer(recipe_from(raw)).train()
    before = summary["heldout_before"]["ranking_accuracy"]
    after = summary["heldout_after"]["ranking_accuracy"]
    assert after >= before + 0.25, (before, after)
    run = tmp_path / "run"
    record = json.loads((run / "run.json").read_text())
    assert record["seed"] == 0 and record["packages"]["torch"] and "git_commit" in record
    assert yaml.safe_load((run / "recipe.yaml").read_text())["loss"][0]["name"] == "dpo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert len(train_lines) == 24
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second"):
        assert key in train_lines[-1], key
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # The final adapter is a plain peft adapter: it loads and generates.
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    out = model.generate(**tok("1 2 3 4", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 4
    # `posttrain eval` on the final adapter scores the same held-out pairs the same way.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "posttrain", "eval", "--model", str(tiny_model_dir), "--adapter",
                             str(run / "final"), "--builtin", "tiny", "--format", "plain", "--max-pairs", "64"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = float(result.stdout.split("ranking accuracy R:")[1].split()[0])
    assert reported == pytest.approx(after, abs=1e-4)


def _train_cli(recipe_path: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe_path), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    def write(name: str) -> Path:
        raw = tiny_recipe(tiny_model_dir, tmp_path / name, checkpoint={"every": 2, "keep_last": 5},
                          run={"output_dir": str(tmp_path / name), "seed": 3, "num_threads": 1,
                               "deterministic": True, "callbacks": ["tests.callbacks:EnvProbes"]},
                          train={"max_steps": 6, "batch_size": 8, "micro_batch_size": 4},
                          data={"heldout": None}, logging={"report_to": ["jsonl"], "progress_bar": False})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    straight = _train_cli(write("straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed_recipe = write("killed")
    killed = _train_cli(killed_recipe, env_extra={"POSTTRAIN_KILL_AFTER_CHECKPOINT": "4"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _train_cli(killed_recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    def steps(run: str) -> dict[int, dict]:
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {x["step"]: x for x in lines if "loss" in x}

    a, b = steps("straight"), steps("killed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-7, abs=1e-9)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-7, abs=1e-9)
    wa = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-7)
    assert any(w.abs().max() > 0 for k, w in wa.items() if "lora_B" in k)


def test_resume_refuses_a_changed_recipe(tiny_model_dir, tmp_path, cli_stderr):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", train={"max_steps": 2, "batch_size": 8, "micro_batch_size": 8},
                      data={"heldout": None}, logging={"report_to": ["jsonl"], "progress_bar": False})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(path)]) == 0
    cli_stderr.readouterr()
    assert cli.main(["train", str(path), "--resume", "--set", "train.lr=0.5"]) == 2
    changed = cli_stderr.readouterr().err
    assert "train.lr: 0.01 in the checkpoint, 0.5 now" in changed and "--force" in changed
    assert "Traceback" not in changed
    assert cli.main(["train", str(path)]) == 2 and "--resume" in cli_stderr.readouterr().err


def test_resume_with_force_after_raising_max_steps_follows_the_new_schedule(tiny_model_dir, tmp_path):
    """A run of 2 linear-decay steps extended to 4 with --resume --force takes the learning rates of a
    straight 4-step run at steps 3 and 4 (0.005, 0.0025), not the old run's final 0.0."""
    def learning_rates(run: str, max_steps: int, **flags) -> dict[int, float]:
        raw = tiny_recipe(tiny_model_dir, tmp_path / run, data={"heldout": None},
                          train={"max_steps": max_steps, "batch_size": 8, "micro_batch_size": 8,
                                 "lr_scheduler": "linear"},
                          logging={"report_to": ["jsonl"], "progress_bar": False})
        Trainer(recipe_from(raw), **flags).train()
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {x["step"]: x["learning_rate"] for x in lines if "loss" in x}

    straight = learning_rates("straight", 4)
    assert straight == pytest.approx({1: 0.01, 2: 0.0075, 3: 0.005, 4: 0.0025})
    learning_rates("extended", 2)
    extended = learning_rates("extended", 4, resume=True, force=True)
    assert extended == pytest.approx({1: 0.01, 2: 0.005, 3: 0.005, 4: 0.0025})


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_loss_stops_or_skips_the_step(tiny_model_dir, tmp_path, policy):
    from posttrain.errors import PosttrainError
    from posttrain.core import StepLoss

    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"heldout": None},
                      train={"batch_size": 8, "micro_batch_size": 4, "on_nonfinite": policy},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    real_loss = trainer.step.loss

    class PoisonedLoss:
        needs_reference = real_loss.needs_reference

        def step_loss(self, inputs, counts):
            out = real_loss.step_loss(inputs, counts)
            return StepLoss(out.loss * float("nan"), out.metrics, out.parts)

    trainer.step.loss = PoisonedLoss()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    if policy == "stop":
        with pytest.raises(PosttrainError, match=r"step 1: the loss is nan.*builtin:tiny/train row"):
            trainer.train_step(0)
    else:
        assert trainer.train_step(0)["skipped"] == 1.0
    for n, p in trainer.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n  # no update was applied
    if policy == "skip":
        trainer.step.loss = real_loss
        assert "skipped" not in trainer.train_step(1)
        assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


def test_sft_trains_the_tiny_task(tiny_model_dir, tmp_path):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": "sft"},
                      train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 24, "lr": 1e-2},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    summary = Trainer(recipe_from(raw)).train()
    before = summary["heldout_before"]["ranking_accuracy"]
    after = summary["heldout_after"]["ranking_accuracy"]
    assert after >= before + 0.25, (before, after)
