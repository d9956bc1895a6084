"""Two processes on CPU (DDP, ZeRO-2, ZeRO-3) train what one process trains, their checkpoints resume
on any number of processes, and a run killed with SIGKILL resumes to the uninterrupted result.

All runs share one small set-up: 13 pairs of varied lengths, 4 pairs per optimiser step (so the last
step of an epoch holds one pair and the second process trains on a zero-weight filler row), 5 steps
(one epoch and one step into the next), a float64 tiny model with LoRA. The one-process references
run in this process; the two-process runs go through `accelerate launch -m posttrain train`.

Tolerances, measured on this set-up (see docs/distributed.md):
- With SGD, DDP keeps the float64 model end to end (measured: 1e-15), ZeRO-2 keeps it but updates
  fp32 master weights (1e-9): rtol 1e-6. ZeRO-3 computes in float32 (DeepSpeed 0.19.8 has no
  float64 model dtype; its partitions are fp32), so the loss carries float32 rounding of a 5-step
  trajectory (measured 9.5e-7): rtol 2e-6.
- With Adam, DeepSpeed's fp32 master copies and ZeRO-3's fp32 compute change each update at the
  float32 level, and Adam's normalisation amplifies that where gradients are near zero: measured
  1.7e-6 on the loss; asserted rtol 1e-5 (adapters: atol 1e-5).
- Resuming under the backend that wrote the checkpoint reproduces the uninterrupted run to 1e-9.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import recipe_from, tiny_recipe, write_varied_pairs
from posttrain.trainer import Trainer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": "cpu_ddp_2proc.yaml", "zero2": "cpu_zero2_2proc.yaml", "zero3": "cpu_zero3_2proc.yaml"}
STEPS = 5
SGD_RTOL = {"ddp": 1e-6, "zero2": 1e-6, "zero3": 2e-6}
ADAM_RTOL = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def data_file(workdir) -> Path:
    return write_varied_pairs(workdir / "pairs.jsonl", n=13)


def _raw(model_dir: Path, data: Path, output_dir: Path, optimizer: str, **train) -> dict:
    lr = {"sgd": 2.0, "adamw": 1e-2}[optimizer]
    return tiny_recipe(model_dir, output_dir, model={"dtype": "float64"},
                       data={"train": {"path": str(data)}, "heldout": None},
                       train={"optimizer": optimizer, "lr": lr, "batch_size": 4, "micro_batch_size": 2,
                              "max_steps": STEPS, "max_grad_norm": None, **train},
                       checkpoint={"every": 2, "keep_last": 5},
                       logging={"progress_bar": False, "report_to": ["jsonl"]})


def _write_recipe(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(backend: str, recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / CONFIGS[backend]), "--main_process_port", str(_free_port()),
            "-m", "posttrain", "train", str(recipe), *extra]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "POSTTRAIN_PG_TIMEOUT": "120", **extra}


def _failure(stderr: str) -> str:
    """The error lines of every process, then the end of the output."""
    signs = ("Error", "error", "terminate", "what()", "Abort", "abort", "Signal")
    errors = [line for line in stderr.splitlines() if any(sign in line for sign in signs)]
    return "\n".join(errors[-30:]) + "\n...\n" + stderr[-2000:]


def _launch(backend: str, recipe: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_launch_command(backend, recipe, *extra), capture_output=True, text=True,
                            env=_env(**env), cwd=ROOT, timeout=600)
    assert result.returncode == 0, _failure(result.stderr)
    assert "built successfully" not in result.stdout + result.stderr  # DeepSpeed compiled nothing
    return result


def _train_here(raw: dict, monkeypatch, probe: Path | None = None, resume: bool = False) -> None:
    with monkeypatch.context() as m:
        if probe is not None:
            m.setenv("POSTTRAIN_STEP_PROBE", str(probe))
        Trainer(recipe_from(raw), resume=resume).train()


def _steps(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if "loss" in x}


def _probe(directory: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (directory / f"rank-{rank}.jsonl").read_text().splitlines()]


def _assert_same_trajectory(run: Path, reference: Path, rtol: float, steps=range(1, STEPS + 1)) -> float:
    """The per-step loss and reward margins of `run` equal those of `reference`; returns the largest
    relative difference of the loss."""
    a, b = _steps(run), _steps(reference)
    worst = 0.0
    for step in steps:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=rtol), step
        assert a[step]["rewards/margins"] == pytest.approx(b[step]["rewards/margins"], rel=100 * rtol, abs=1e-9)
        worst = max(worst, abs(a[step]["loss"] - b[step]["loss"]) / abs(b[step]["loss"]))
    return worst


def _assert_same_adapter(run: Path, reference: Path, atol: float) -> None:
    import torch
    from safetensors.torch import load_file

    a = load_file(str(run / "final" / "adapter_model.safetensors"))
    b = load_file(str(reference / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=0, atol=atol)
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)  # the adapter did train


@pytest.fixture(scope="module")
def sgd_reference(tiny_model_dir, data_file, workdir):
    run, probe = workdir / "sgd-1", workdir / "sgd-1-probe"
    mp = pytest.MonkeyPatch()
    try:
        _train_here(_raw(tiny_model_dir, data_file, run, "sgd"), mp, probe)
    finally:
        mp.undo()
    return run


@pytest.fixture(scope="module")
def adam_reference(tiny_model_dir, data_file, workdir):
    run = workdir / "adam-1"
    mp = pytest.MonkeyPatch()
    try:
        _train_here(_raw(tiny_model_dir, data_file, run, "adamw"), mp)
    finally:
        mp.undo()
    return run


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_two_processes_follow_the_one_process_trajectory(backend, tiny_model_dir, data_file, workdir,
                                                         sgd_reference):
    run, probe = workdir / f"sgd-{backend}", workdir / f"sgd-{backend}-probe"
    result = _launch(backend, _write_recipe(_raw(tiny_model_dir, data_file, run, "sgd"), workdir / f"{backend}.yaml"),
                     POSTTRAIN_STEP_PROBE=str(probe))
    worst = _assert_same_trajectory(run, sgd_reference, SGD_RTOL[backend])
    print(f"{backend}: largest relative loss difference to one process over {STEPS} SGD steps: {worst:.2e}")
    ranks = [_probe(probe, 0), _probe(probe, 1)]
    assert [len(r) for r in ranks] == [STEPS, STEPS]
    for zero, one in zip(*ranks):
        assert zero["params_sha256"] == one["params_sha256"], zero["step"]  # every rank holds the same adapter
        assert (zero["world"], one["world"], zero["rank"], one["rank"]) == (2, 2, 0, 1)
        mine = [i for mb in zero["rows"] for i in mb if i is not None]
        theirs = [i for mb in one["rows"] for i in mb if i is not None]
        assert not set(mine) & set(theirs)  # different shards
    epoch = [i for r in ranks for line in r[:4] for mb in line["rows"] for i in mb if i is not None]
    assert sorted(epoch) == list(range(13))  # the first epoch covers every pair exactly once
    assert ranks[1][3]["rows"] == [[None]]  # the second process fills the one-pair last step with a zero-weight row
    # One process writes logs and reports; the metrics are the reduced ones checked above.
    assert result.stderr.count("data.train:") == 1
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert len(_steps(run)) == STEPS


@pytest.fixture(scope="module")
def adam_zero3(tiny_model_dir, data_file, workdir):
    run = workdir / "adam-zero3"
    _launch("zero3", _write_recipe(_raw(tiny_model_dir, data_file, run, "adamw"), workdir / "adam-zero3.yaml"))
    return run


def test_adam_under_zero3_follows_one_process(adam_zero3, adam_reference):
    worst = _assert_same_trajectory(adam_zero3, adam_reference, ADAM_RTOL)
    print(f"zero3 Adam: largest relative loss difference to one process: {worst:.2e}")
    _assert_same_adapter(adam_zero3, adam_reference, atol=1e-5)


def _checkpoint_run(source: Path, step: int, target: Path) -> Path:
    """A copy of run `source` as it was right after checkpoint `step`: to resume elsewhere."""
    target.mkdir()
    shutil.copytree(source / "checkpoints" / f"step-{step:08d}", target / "checkpoints" / f"step-{step:08d}")
    lines = (source / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 0) <= step))
    return target


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_a_one_process_checkpoint_resumes_on_two_processes(backend, tiny_model_dir, data_file, workdir,
                                                           adam_reference):
    run = _checkpoint_run(adam_reference, 2, workdir / f"adam-1-to-{backend}")
    result = _launch(backend, _write_recipe(_raw(tiny_model_dir, data_file, run, "adamw"),
                                            workdir / f"adam-1-to-{backend}.yaml"), "--resume")
    assert "written by 1 process" in result.stderr
    rtol = 1e-9 if backend == "ddp" else ADAM_RTOL  # DDP keeps float64 and torch's own Adam
    _assert_same_trajectory(run, adam_reference, rtol, steps=range(3, STEPS + 1))
    _assert_same_adapter(run, adam_reference, atol=1e-9 if backend == "ddp" else 1e-5)


def test_a_zero3_checkpoint_resumes_on_one_process(tiny_model_dir, data_file, workdir, adam_zero3, monkeypatch):
    run = _checkpoint_run(adam_zero3, 4, workdir / "adam-zero3-to-1")
    _train_here(_raw(tiny_model_dir, data_file, run, "adamw"), monkeypatch, resume=True)
    _assert_same_trajectory(run, adam_zero3, ADAM_RTOL)
    _assert_same_adapter(run, adam_zero3, atol=1e-5)


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_launch_at_step(command: list[str], run: Path, step: int) -> None:
    """Start `command` in its own process group, and once step `step` is logged, SIGKILL the group and
    every process under it (torchrun starts each worker in a session of its own)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=ROOT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and step in _steps(run):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
    everyone = [proc.pid] + _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.wait(timeout=60) == -signal.SIGKILL
    time.sleep(0.5)
    assert not [pid for pid in everyone if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not (run / "final").exists()


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((v[5:].decode() for v in environ if v.startswith(b"RANK=")), None)


def test_a_process_killed_alone_stops_the_others_and_the_run_resumes(tiny_model_dir, data_file, workdir,
                                                                     adam_zero3):
    """SIGKILL of the second ZeRO-3 process only: the first does not hang (gloo sees its peer gone,
    torchrun stops the rest, and POSTTRAIN_PG_TIMEOUT bounds any wait), and --resume recovers."""
    step = random.Random("kill-one-worker").randint(1, STEPS - 1)
    run = workdir / "killed-one-worker"
    recipe = _write_recipe(_raw(tiny_model_dir, data_file, run, "adamw"), workdir / "killed-one-worker.yaml")
    proc = subprocess.Popen(_launch_command("zero3", recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=ROOT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ((run / "metrics.jsonl").is_file()
                                                                    and step in _steps(run)):
        time.sleep(0.05)
    [second] = [pid for pid in _descendants(proc.pid) if _rank_of(pid) == "1"
                and "posttrain" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(second, signal.SIGKILL)
    started = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None) and time.time() - started < 60, stderr[-3000:]
    assert not _descendants(proc.pid)
    result = subprocess.run(_launch_command("zero3", recipe) + ["--resume"], capture_output=True, text=True,
                            env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, _failure(result.stderr)
    _assert_same_trajectory(run, adam_zero3, 1e-9)
    _assert_same_adapter(run, adam_zero3, atol=1e-9)


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tiny_model_dir, data_file, workdir, adam_zero3):
    """Under ZeRO-3 (one process: test_trainer's sigkill test)."""
    step = random.Random("kill-zero3").randint(1, STEPS - 1)
    run = workdir / "killed-zero3"
    recipe = _write_recipe(_raw(tiny_model_dir, data_file, run, "adamw"), workdir / "killed-zero3.yaml")
    _kill_launch_at_step(_launch_command("zero3", recipe), run, step)
    result = subprocess.run(_launch_command("zero3", recipe) + ["--resume"], capture_output=True, text=True,
                            env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    if step >= 2:
        assert "resumed from" in result.stderr
    _assert_same_trajectory(run, adam_zero3, 1e-9)
    _assert_same_adapter(run, adam_zero3, atol=1e-9)


NAN_ON_SECOND_PROCESS = '''
import os

from posttrain.losses import LossOutput
from posttrain.losses.dpo import DPOLoss


class NaNOnSecondProcess(DPOLoss):
    """DPO whose loss is NaN on process 1 only, in optimiser step 2 (one micro-batch per step)."""

    calls = 0

    def __call__(self, inputs):
        out = super().__call__(inputs)
        NaNOnSecondProcess.calls += 1
        if os.environ.get("RANK") == "1" and NaNOnSecondProcess.calls == 2:
            return LossOutput(out.loss * float("nan"), out.metrics, out.parts)
        return out
'''


def _nan_recipe(tiny_model_dir, data_file, workdir, name: str) -> Path:
    (workdir / "nan_loss.py").write_text(NAN_ON_SECOND_PROCESS)
    raw = _raw(tiny_model_dir, data_file, workdir / name, "sgd", on_nonfinite="skip", max_steps=3)
    raw["loss"] = {"name": "nan_loss:NaNOnSecondProcess", "params": {"beta": 0.1}}
    return _write_recipe(raw, workdir / f"{name}.yaml")


def test_a_nan_on_one_process_skips_the_step_on_every_process(tiny_model_dir, data_file, workdir):
    probe = workdir / "nan-ddp-probe"
    _launch("ddp", _nan_recipe(tiny_model_dir, data_file, workdir, "nan-ddp"), POSTTRAIN_STEP_PROBE=str(probe))
    steps = _steps(workdir / "nan-ddp")
    assert [steps[s].get("skipped") for s in (1, 2, 3)] == [None, 1.0, None]
    ranks = [_probe(probe, 0), _probe(probe, 1)]
    hashes = [[line["params_sha256"] for line in r] for r in ranks]
    assert hashes[0] == hashes[1]  # both processes decided alike
    assert hashes[0][1] == hashes[0][0] != hashes[0][2]  # step 2 changed nothing, step 3 trained again


def test_a_nan_on_one_process_stops_every_process_under_deepspeed(tiny_model_dir, data_file, workdir):
    result = subprocess.run(_launch_command("zero2", _nan_recipe(tiny_model_dir, data_file, workdir, "nan-zero2")),
                            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode != 0
    for where in ("posttrain error: step 2: the loss is nan", "posttrain error (process 1): step 2: the loss is nan"):
        assert where in result.stderr, result.stderr[-3000:]
    assert "cannot be skipped" in result.stderr
    assert "posttrain/trainer.py" not in result.stderr  # the processes print no traceback
    assert not (workdir / "nan-zero2" / "final").exists()


def test_a_kill_between_writing_and_renaming_a_checkpoint_resumes_from_the_one_before(
        tiny_model_dir, data_file, workdir, adam_reference):
    run = workdir / "killed-before-rename"
    recipe = _write_recipe(_raw(tiny_model_dir, data_file, run, "adamw"), workdir / "killed-before-rename.yaml")
    command = [sys.executable, "-m", "posttrain", "train", str(recipe)]
    killed = subprocess.run(command, capture_output=True, text=True, env=_env(POSTTRAIN_KILL_BEFORE_RENAME="4"),
                            cwd=ROOT, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-00000002"]
    assert [p for p in root.iterdir() if p.name.startswith(".tmp-step-00000004")]  # written, never renamed
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=_env(), cwd=ROOT,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000002 (step 2" in resumed.stderr
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    _assert_same_trajectory(run, adam_reference, 1e-12)
    _assert_same_adapter(run, adam_reference, atol=1e-12)


def test_full_fine_tuning_under_deepspeed_resumes_from_its_own_sharded_checkpoint(tiny_model_dir, data_file,
                                                                                  workdir, monkeypatch):
    """LoRA off: each process writes its own partition in DeepSpeed's format, and the run resumes
    from it under the same ZeRO stage and number of processes (and refuses anything else)."""
    def recipe(run: Path) -> dict:
        raw = _raw(tiny_model_dir, data_file, run, "adamw", lr=1e-3)
        raw["lora"] = {"enabled": False}
        return raw

    straight = workdir / "full-zero2"
    _launch("zero2", _write_recipe(recipe(straight), workdir / "full-zero2.yaml"))
    checkpoint = straight / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["deepspeed", "rng.pt", "scheduler.pt",
                                                            "trainable_state.json", "trainer_state.json"]
    assert len(list((checkpoint / "deepspeed" / "engine").glob("*optim_states.pt"))) == 2  # one per process
    run = _checkpoint_run(straight, 2, workdir / "full-zero2-resumed")
    result = _launch("zero2", _write_recipe(recipe(run), workdir / "full-zero2-resumed.yaml"), "--resume")
    assert "resumed from" in result.stderr
    _assert_same_trajectory(run, straight, 1e-9, steps=range(3, STEPS + 1))
    from posttrain.errors import PosttrainError

    with pytest.raises(PosttrainError, match="ZeRO-2 on 2 processes; it resumes only with the same"):
        _train_here(recipe(run), monkeypatch, resume=True)


def test_full_fine_tuning_on_one_process_resumes_from_the_model_and_optimiser_state(tiny_model_dir, data_file,
                                                                                    workdir, monkeypatch):
    """LoRA off, no DeepSpeed: the parameters come back from adapter/model.safetensors, the optimiser
    state from trainable_state.safetensors."""
    def recipe(run: Path) -> dict:
        raw = _raw(tiny_model_dir, data_file, run, "adamw", lr=1e-3)
        raw["lora"] = {"enabled": False}
        return raw

    straight = workdir / "full-1"
    _train_here(recipe(straight), monkeypatch)
    from safetensors.torch import load_file

    state = load_file(str(straight / "checkpoints" / "step-00000002" / "trainable_state.safetensors"))
    assert state and not [k for k in state if k.startswith("param/")]  # the weights are in adapter/ only
    run = _checkpoint_run(straight, 2, workdir / "full-1-resumed")
    _train_here(recipe(run), monkeypatch, resume=True)
    _assert_same_trajectory(run, straight, 1e-12, steps=range(3, STEPS + 1))
