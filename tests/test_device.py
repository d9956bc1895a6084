"""No step tensor on an implicit device: inside a training step, every tensor posttrain's own code creates with a
factory call (torch.tensor, zeros, full, arange, ...) names its device. On a CPU-only machine an implicit
device is silently right; on a GPU it puts step tensors on the CPU beside CUDA weights. A TorchFunctionMode
watches every factory call during one step of each mode and fails on one without `device=` whose caller is
posttrain's step code (the steps, the core, the losses, the row layouts, the reference, the rollouts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import recipe_from, tiny_recipe

import posttrain

PACKAGE = Path(posttrain.__file__).resolve().parent
WATCHED = [PACKAGE / "steps", PACKAGE / "core", PACKAGE / "losses", PACKAGE / "rollout", PACKAGE / "data" / "layout.py",
           PACKAGE / "models.py", PACKAGE / "plan.py"]
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand, torch.randn,
             torch.randint, torch.eye, torch.linspace, torch.as_tensor}
TORCH_DIR = Path(torch.__file__).resolve().parent


class ImplicitDevices(TorchFunctionMode):
    """Records factory calls without a device made directly by watched posttrain code."""

    def __init__(self):
        super().__init__()
        self.offences: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH_DIR):
                frame = frame.f_back
            if frame is not None:
                path = Path(frame.f_code.co_filename).resolve()
                if any(path == w or path.is_relative_to(w) for w in WATCHED):
                    self.offences.append(f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


def _one_step(raw: dict) -> list[str]:
    from posttrain.trainer import Trainer

    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    watch = ImplicitDevices()
    with watch:
        record = trainer.train_step(0)
    assert record["loss"] == record["loss"]  # a real step ran (not NaN)
    if trainer.online:
        trainer.rewards.close()
    return sorted(set(watch.offences))


@pytest.mark.parametrize("layout", [{"share_prompt": False, "packing": False}, {"share_prompt": True, "packing": False},
                                    {"share_prompt": True, "packing": True, "pack_tokens": 64}])
def test_a_pair_step_creates_no_tensor_on_an_implicit_device(tiny_model_dir, tmp_path, layout):
    raw = tiny_recipe(tiny_model_dir, tmp_path, data={"heldout": None}, eval={"at_start": False, "at_end": False},
                      train={"batch_size": 4, "micro_batch_size": 2, "max_steps": 1, **layout})
    assert _one_step(raw) == []


def test_a_group_step_creates_no_tensor_on_an_implicit_device(tiny_model_dir, tmp_path):
    raw = tiny_recipe(tiny_model_dir, tmp_path, loss={"name": "grpo", "params": {"beta": 0.04}},
                      rewards=[{"name": "math"}], rollout={"group_size": 2, "max_new_tokens": 4, "reward_workers": 0,
                                                           "updates_per_batch": 2},
                      data={"train": {"builtin": "addition", "split": "train", "num_rows": 8}, "heldout": None,
                            "template": "chat"},
                      eval={"at_start": False, "at_end": False},
                      train={"batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "share_prompt": True})
    assert _one_step(raw) == []


def test_the_watch_catches_an_implicit_device():
    """The check can fail: a factory call without a device in watched code is recorded."""
    from posttrain.plan import round_robin

    watch = ImplicitDevices()
    code = compile("torch.zeros(2)", str(PACKAGE / "plan.py"), "eval")
    with watch:
        eval(code, {"torch": torch, "round_robin": round_robin})
    assert watch.offences and "torch.zeros" in watch.offences[0]
