"""Online RL under 2-process DeepSpeed ZeRO-3 with LoRA on CPU: generation with ranks that finish at different
lengths, training, checkpoints, and a resume that restores the sampler (real DeepSpeed, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from helpers import recipe_from, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

UNEQUAL_ENGINE = '''
from dataclasses import replace

import torch.distributed as dist

from posttrain.rollout import HFGenerateEngine


class UnequalLengths(HFGenerateEngine):
    """The HF engine, but process 1 always generates 4x as many tokens as process 0, so under ZeRO-3 the ranks
    run different numbers of forward passes."""

    @classmethod
    def from_context(cls, context):
        return cls(context)

    def __init__(self, context):
        base = HFGenerateEngine.from_context(context)
        super().__init__(base.model_getter, base.pad_id, base.stop_ids, base.batch_size, base.gather, base.autocast)
        self.stop_ids = set()  # never stop early: lengths are exactly as set below

    def generate(self, prompts, params):
        rank = dist.get_rank() if dist.is_initialized() else 0
        n = 2 if rank == 0 else 8
        return super().generate(prompts, replace(params, max_new_tokens=n, min_new_tokens=n))
'''


def _launch(recipe: Path, *extra, env=None, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{recipe.parent}", "POSTTRAIN_PG_TIMEOUT": "90",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu_zero3_2proc.yaml"), "--main_process_port", str(port),
                           "-m", "posttrain", "train", str(recipe), *extra],
                          capture_output=True, text=True, env=env, cwd=recipe.parent, timeout=400)


@pytest.mark.slow
def test_zero3_online_run_with_unequal_generation_lengths_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    (tmp_path / "unequal_engine.py").write_text(UNEQUAL_ENGINE)
    shutil.copy(TESTS / "online_rewards.py", tmp_path / "online_rewards.py")
    recipes = {}
    for name in ("full", "killed"):
        raw = tiny_recipe(tiny_model_dir, tmp_path / name, loss={"name": "grpo", "params": {}},
                          data={"train": {"builtin": "tiny", "split": "train"},
                                "heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 6},
                                "template": "plain", "max_length": 64},
                          rewards=[{"name": "online_rewards:letter_share"}],
                          rollout={"group_size": 2, "max_new_tokens": 8, "reward_workers": 0,
                                   "engine": "unequal_engine:UnequalLengths"},
                          sampler={"name": "vade", "success_threshold": 0.8},
                          train={"lr": 1e-2, "batch_size": 4, "micro_batch_size": 1, "max_steps": 4,
                                 "lr_scheduler": "constant"},
                          checkpoint={"every": 2}, eval={"at_start": False, "at_end": True},
                          logging={"progress_bar": False, "report_to": ["jsonl"]})
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(raw))

    with ThreadPoolExecutor(2) as pool:  # the uninterrupted run and the killed one side by side
        full_run = pool.submit(_launch, recipes["full"], port=29531)
        killed_run = pool.submit(_launch, recipes["killed"], env={"POSTTRAIN_KILL_AFTER_CHECKPOINT": "2"}, port=29533)
        full, killed = full_run.result(), killed_run.result()
    assert full.returncode == 0, full.stderr[-4000:]
    steps = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in steps if "reward/mean" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    # 2 groups of 2 completions per process: 2 tokens on rank 0, 8 on rank 1 -> mean length 5
    assert all(m["completions/mean_length"] == 5.0 and m["completions/max_length"] == 8.0 for m in train)
    assert all(m["time/gather_parameters"] >= 0 for m in train)
    assert json.loads((tmp_path / "full" / "run.json").read_text())["world_size"] == 2

    assert killed.returncode != 0 and not (tmp_path / "killed" / "summary.json").exists()
    resumed = _launch(recipes["killed"], "--resume", port=29535)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    def sampler_state(run: str) -> dict:
        return json.loads((tmp_path / run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["sampler"]

    assert sampler_state("full") == sampler_state("killed")
    again = [m for m in (json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
             if "reward/mean" in m]
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(train, again):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)


DETERMINISTIC_ENGINE = '''
import torch

from posttrain.rollout import GenerationEngine, cut_at_stop


class SeededCompletions(GenerationEngine):
    """Completions that depend only on the prompt, its place in the group and the step, never on which
    process generates them or on the weights: 1-process and 2-process runs train on the same rollouts."""

    def __init__(self, context):
        self.context = context
        self.eos = context.tokenizer.eos_token_id

    def generate(self, prompts, params):
        out, seen = [], {}
        for ids in prompts:
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            g = torch.Generator().manual_seed(hash((tuple(ids), k, self.context.current_step())) % 2**31)
            length = int(torch.randint(2, params.max_new_tokens + 2, (1,), generator=g))
            tokens = torch.randint(200, 3000, (length,), generator=g).tolist()
            out.append(cut_at_stop(tokens[:length - 1] + [self.eos], {self.eos}, params.max_new_tokens))
        return out
'''


def _grpo_raw(model_dir, output_dir, optimizer="sgd"):
    return tiny_recipe(model_dir, output_dir, model={"dtype": "float64"},
                       loss={"name": "grpo", "params": {"beta": 0.1, "loss_type": "dapo", "scale_rewards": "batch"}},
                       data={"train": {"builtin": "tiny", "split": "train", "num_rows": 64}, "heldout": None,
                             "template": "plain", "max_length": 64},
                       rewards=[{"name": "online_rewards:letter_share"}],
                       rollout={"group_size": 3, "max_new_tokens": 6, "reward_workers": 0,
                                "engine": "seeded_engine:SeededCompletions"},
                       train={"optimizer": optimizer, "lr": 0.5, "batch_size": 4, "micro_batch_size": 1,
                              "max_steps": 5, "max_grad_norm": None, "lr_scheduler": "constant"},
                       logging={"progress_bar": False, "report_to": ["jsonl"]})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_grpo_on_two_processes_follows_the_one_process_trajectory(backend, tiny_model_dir, tmp_path_factory,
                                                                  monkeypatch):
    """Advantages on the gathered batch (the batch std of `scale_rewards: batch`), whole groups per process and
    micro-batch, global normalisers: with the same rollouts, 2 processes take the same SGD steps as 1 (KL to
    the reference on, so the loss depends on the weights)."""
    from test_distributed import SGD_RTOL, _launch, _steps, _write_recipe

    from posttrain.trainer import Trainer

    work = tmp_path_factory.mktemp(f"grpo-{backend}")
    (work / "seeded_engine.py").write_text(DETERMINISTIC_ENGINE)
    shutil.copy(TESTS / "online_rewards.py", work / "online_rewards.py")
    monkeypatch.syspath_prepend(str(work))
    one = work / "one"
    Trainer(recipe_from(_grpo_raw(tiny_model_dir, one))).train()
    two = work / "two"
    _launch(backend, _write_recipe(_grpo_raw(tiny_model_dir, two), work / "two.yaml"), PYTHONPATH=f"{ROOT}{os.pathsep}{work}")
    a, b = _steps(two), _steps(one)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step]["reward/mean"] == b[step]["reward/mean"]  # the same rollouts
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=SGD_RTOL[backend]), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=SGD_RTOL[backend]), step
    assert a[5]["kl"] > 0  # the policy moved away from its reference
