"""Bad input as a new user would try it, each through the `posttrain train` command: one paragraph
that names the problem, exit status 2, no traceback, and nothing left in the output directory.

Each case runs the CLI's main function in this process (the same code `python -m posttrain` runs;
one case also goes through a real subprocess). The readers' and the recipe checker's messages are
tested in detail in test_data.py and test_recipe_cli.py; here the point is the whole path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_recipe, write_varied_pairs
from posttrain import cli

ROOT = Path(__file__).resolve().parents[1]


def _valid_row(i: int = 0) -> str:
    return json.dumps({"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"})


def _data_with(tmp_path: Path, content: bytes) -> dict:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    return {"train": {"path": str(path)}, "heldout": None}


def _case(name: str, tmp_path: Path) -> tuple[dict, list[str]]:
    """(recipe changes, words the message must contain) of one mistake."""
    good = (_valid_row(0) + "\n" + _valid_row(1) + "\n").encode()
    if name == "corrupt jsonl line":
        return {"data": _data_with(tmp_path, good + b'{"prompt": "Q?", "chosen": " a",\n')}, ["data.jsonl, line 3",
                                                                                              "invalid JSON"]
    if name == "non-utf8 file":
        return {"data": _data_with(tmp_path, good + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))}, [
            "data.jsonl", "not UTF-8", "line 3"]
    if name == "wrong field names":
        rows = "".join(json.dumps({"question": "Q?", "good": " a", "bad": " b"}) + "\n" for _ in range(2))
        return {"data": _data_with(tmp_path, rows.encode())}, ["data.jsonl", "prompt", "chosen", "rejected"]
    if name == "empty data set":
        return {"data": _data_with(tmp_path, b"\n\n")}, ["data.jsonl", "empty"]
    if name == "over-long row with truncation error":
        data = write_varied_pairs(tmp_path / "varied.jsonl", n=8)
        return {"data": {"train": {"path": str(data)}, "heldout": None, "template": "plain", "max_length": 24,
                         "truncation": "error"}}, ["varied.jsonl", "row", "max_length"]
    if name == "unknown loss":
        return {"loss": {"name": "dpoo"}}, ["unknown loss 'dpoo'", "Did you mean 'dpo'"]
    if name == "negative learning rate":
        return {"train": {"lr": -1e-4}}, ["train.lr must be positive", "-0.0001"]
    if name == "rdpo eps of 0.5":
        return {"loss": {"name": "rdpo", "params": {"eps": 0.5}}}, ["eps", "0 <= eps < 0.5", "0.5"]
    if name == "user loss module that does not import":
        (tmp_path / "my_loss.py").write_text("import numpy as np\nimport no_such_package_xyz\n")
        return {"loss": {"name": "my_loss:MyLoss"}}, ["my_loss", "no_such_package_xyz"]
    raise KeyError(name)


# A typo in a key and a missing model path go through the real command in test_recipe_cli.py.
CASES = ["corrupt jsonl line", "non-utf8 file", "wrong field names", "empty data set",
         "over-long row with truncation error", "unknown loss", "negative learning rate", "rdpo eps of 0.5",
         "user loss module that does not import"]


def _recipe(tmp_path: Path, model_dir: Path, case: str) -> tuple[Path, list[str], Path]:
    changes, words = _case(case, tmp_path)
    run = tmp_path / "run"
    raw = tiny_recipe(model_dir, run, logging={"progress_bar": False, "report_to": ["jsonl"]},
                      train={"max_steps": 2, "batch_size": 2, "micro_batch_size": 2})
    for section, values in changes.items():
        raw[section] = values if section == "loss" else {**raw[section], **values}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, words, run


def _assert_nothing_written(run: Path) -> None:
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*")) if run.exists() else []
    assert left == [], left


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_gets_one_paragraph_and_leaves_nothing_behind(case, tmp_path, tiny_model_dir, cli_stderr,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)  # a new user's working directory, not the repository
    path, words, run = _recipe(tmp_path, tiny_model_dir, case)
    assert cli.main(["train", str(path)]) == 2
    err = cli_stderr.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("posttrain error")]
    assert len(errors) == 1, err[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in err
    _assert_nothing_written(run)


def test_the_real_command_exits_2_without_traceback(tmp_path, tiny_model_dir):
    path, words, run = _recipe(tmp_path, tiny_model_dir, "corrupt jsonl line")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("posttrain error")]
    assert "Traceback" not in result.stderr and all(w in result.stderr for w in words)
    _assert_nothing_written(run)


# ------------------------------------------------------------------------ data and plug-ins before any model
def _early_case(name: str, tmp_path: Path, model_dir: Path) -> tuple[dict, list[str]]:
    """(recipe, words of the message) of a mistake that must be found before the model loads."""
    good = (_valid_row(0) + "\n" + _valid_row(1) + "\n").encode()
    offline = tiny_recipe(model_dir, tmp_path / "run", logging={"progress_bar": False, "report_to": ["jsonl"]},
                          train={"max_steps": 2, "batch_size": 2, "micro_batch_size": 2})
    online = tiny_recipe(model_dir, tmp_path / "run", loss={"name": "grpo"}, rewards=[{"name": "exact_match"}],
                         rollout={"group_size": 2, "max_new_tokens": 4, "reward_workers": 0},
                         logging={"progress_bar": False, "report_to": ["jsonl"]},
                         train={"max_steps": 2, "batch_size": 2, "micro_batch_size": 2})
    if name == "missing data path":
        offline["data"] = {**offline["data"], "train": {"path": str(tmp_path / "nosuch.jsonl")}, "heldout": None}
        return offline, ["nosuch.jsonl", "does not exist"]
    if name == "broken json":
        offline["data"] = {**offline["data"], **_data_with(tmp_path, good + b'{"prompt": "Q?", "chosen": \n')}
        return offline, ["data.jsonl, line 3", "invalid JSON"]
    if name == "missing field":
        rows = good + (json.dumps({"prompt": "Q?", "chosen": " a"}) + "\n").encode()
        offline["data"] = {**offline["data"], **_data_with(tmp_path, rows)}
        return offline, ["data.jsonl, row 3", "'rejected'", "missing field"]
    if name == "wrong columns":
        rows = "".join(json.dumps({"question": "Q?", "good": " a", "bad": " b"}) + "\n" for _ in range(2))
        offline["data"] = {**offline["data"], **_data_with(tmp_path, rows.encode())}
        return offline, ["data.jsonl", "cannot tell the data format"]
    if name == "prompt without the answer its reward needs":
        rows = [{"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "2 + 2 ="}, {"prompt": "3 + 3 =", "answer": "6"}]
        path = tmp_path / "prompts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        online["data"] = {**online["data"], "train": {"path": str(path)}, "heldout": None}
        return online, ["prompts.jsonl, row 2", "'answer'", "exact_match"]
    if name == "sampler param typo":
        online["sampler"] = {"name": "vade", "params": {"lambda_1": 0.2}}
        return online, ["sampler.params (vade)", "lambda_1", "Did you mean 'lambda1'"]
    if name == "sampler param out of range":
        online["sampler"] = {"name": "vade", "params": {"lambda1": 1.5}}
        return online, ["sampler.params (vade)", "lambda1", "[0, 1]", "1.5"]
    raise KeyError(name)


EARLY_CASES = ["missing data path", "broken json", "missing field", "wrong columns",
               "prompt without the answer its reward needs", "sampler param typo", "sampler param out of range"]


@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize("case", EARLY_CASES)
def test_data_and_plugin_mistakes_are_reported_before_any_model_loads(case, command, tmp_path, tiny_model_dir,
                                                                      cli_stderr, monkeypatch):
    import posttrain.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(posttrain.models, "load_causal_lm", no_model)
    monkeypatch.chdir(tmp_path)
    raw, words = _early_case(case, tmp_path, tiny_model_dir)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main([command, str(path)]) == 2
    err = cli_stderr.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("posttrain error")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_validate_reads_the_data_and_says_what_it_found(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import posttrain.models

    monkeypatch.setattr(posttrain.models, "load_causal_lm", lambda *a, **k: pytest.fail("validate loaded a model"))
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["validate", str(path)]) == 0
    assert "valid (recipe, plug-ins and data: 256 training pairs, 64 held-out pairs)" in capsys.readouterr().out


def test_eval_on_a_missing_file_is_one_paragraph(tmp_path, cli_stderr, tiny_model_dir):
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nosuch.jsonl"),
                     "--no-progress"])
    err = cli_stderr.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "nosuch.jsonl" in err and "does not exist" in err
