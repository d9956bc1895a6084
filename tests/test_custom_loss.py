"""The custom-loss walkthrough in docs/custom_losses.md: its exact code trains from a recipe, from a
module outside posttrain/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _doc_blocks(kind: str) -> list[str]:
    text = (ROOT / "docs" / "custom_losses.md").read_text()
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S)


def test_the_documented_custom_loss_trains_from_a_recipe(tiny_model_dir, tmp_path):
    module_code = _doc_blocks("python")[0]
    (tmp_path / "gamma_dpo.py").write_text(module_code)
    loss_section = yaml.safe_load(_doc_blocks("yaml")[0])["loss"]
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss=loss_section,
                      train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 48, "lr": 2e-2,
                             "share_prompt": False},  # the trajectory the threshold was set on (fp32 drift)
                      logging={"report_to": ["jsonl"], "progress_bar": False})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=600)  # cwd is not the module's directory
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before = summary["heldout_before"]["ranking_accuracy"]
    after = summary["heldout_after"]["ranking_accuracy"]
    assert after >= before + 0.25, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "gamma_dpo/margin" in [x for x in lines if "loss" in x][-1]


def test_the_documented_loss_equals_dpo_at_gamma_one():
    import torch

    namespace: dict = {}
    exec(compile(_doc_blocks("python")[0], "gamma_dpo.py", "exec"), namespace)
    from posttrain.config import LossTerm
    from posttrain.core import StepCounts
    from posttrain.losses import PairLossInputs, build_loss

    d = torch.float64
    inputs = PairLossInputs(torch.tensor([[-2, -3, -5.]], dtype=d), torch.tensor([[-4, -4, -4.]], dtype=d),
                            torch.ones(1, 3, dtype=d), torch.ones(1, 3, dtype=d), torch.ones(1, dtype=d),
                            torch.tensor([[-2.5, -3.5, -5]], dtype=d), torch.tensor([[-4, -3.5, -4]], dtype=d))
    counts = StepCounts(examples=1, tokens=3)
    gamma_dpo = namespace["GammaScaledDPO"]
    gamma_one = gamma_dpo(gamma_dpo.Params(beta=0.1, gamma=1.0)).step_loss(inputs, counts).loss
    dpo = build_loss([LossTerm("dpo", params={"beta": 0.1})]).step_loss(inputs, counts).loss
    assert abs(gamma_one.item() - 0.6209570477895321) < 1e-12 and abs(dpo.item() - gamma_one.item()) < 1e-12
    gamma_zero = gamma_dpo(gamma_dpo.Params(beta=0.1, gamma=0.0)).step_loss(inputs, counts).loss
    assert abs(gamma_zero.item() - (-torch.nn.functional.logsigmoid(torch.tensor(0.2, dtype=d))).item()) < 1e-12
