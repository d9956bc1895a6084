"""Launching: several processes really train together (gloo on CPU), and a process that would
train alone is stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_recipe
from posttrain.errors import PosttrainError

ROOT = Path(__file__).resolve().parents[1]


def test_world_size_without_a_launcher_is_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tmp_path / "run")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONPATH": str(ROOT), "WORLD_SIZE": "2"})
    result = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "WORLD_SIZE=2" in result.stderr and "train alone" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_accelerate_launch_num_processes_without_multi_gpu_names_the_fix(tiny_model_dir, tmp_path):
    """On CPU, `accelerate launch --num_processes 2` (no --multi_gpu) runs the script once; posttrain
    stops instead of training alone, before it writes anything."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tmp_path / "run")))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                             "-m", "posttrain", "train", str(path)], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert "`accelerate launch --num_processes 2` started one process" in result.stderr, result.stderr[-2000:]
    assert "--multi_gpu --num_processes 2" in result.stderr
    assert f'File "{ROOT / "posttrain"}' not in result.stderr  # accelerate's own report of the exit may follow
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("processes, kind", [(1, "MULTI_CPU"), (2, "NO")])
def test_a_launch_that_ends_up_with_one_process_is_refused(monkeypatch, processes, kind):
    """If accelerate ever sets up one process although the launcher started two (as it does on CPU
    without an explicit gloo backend), or two processes without data parallelism (as `--multi_gpu`
    does on CPU unless told cpu=True), the run stops instead of training alone."""
    import accelerate
    from accelerate.utils import DistributedType

    from posttrain import runtime

    class OneProcessAccelerator:
        num_processes = processes
        distributed_type = DistributedType[kind]

        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", OneProcessAccelerator)
    monkeypatch.setattr(accelerate, "InitProcessGroupKwargs", lambda **kw: kw)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PosttrainError, match="train alone"):
        runtime.make_accelerator(1)


@pytest.mark.slow
def test_two_processes_train_together(tiny_model_dir, tmp_path):
    path = tmp_path / "r.yaml"
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 2},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POSTTRAIN_PG_TIMEOUT": "120"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "accelerate_configs" / "cpu_ddp_2proc.yaml"), "--main_process_port", "29517",
                             "-m", "posttrain", "train", str(path)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    assert result.stderr.count("data.train:") == 1  # one process reports
    assert result.stdout.count("[posttrain] 2 processes (backend gloo, distributed type MULTI_CPU") == 1
    assert "3 steps of 8 pairs, 2 micro-batches of up to 2 per process per step" in result.stdout
    assert f"outputs in {(tmp_path / 'run').resolve()}" in result.stdout
    assert f"final adapter: {(tmp_path / 'run' / 'final').resolve()}" in result.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
