"""Checkpoints that survive a kill at any moment.

Layout: <output_dir>/checkpoints/step-00000010/ with
  adapter/                 LoRA adapter in peft format (safetensors), or model.safetensors without LoRA
  optimizer.pt, scheduler.pt, rng.pt   read back with torch.load(weights_only=True)
  trainer_state.json       step, data position, recipe, metrics so far
A checkpoint is written to a temporary directory and renamed into place: a directory named
`step-*` is complete, whatever moment the process died at. Only one process writes.

Test hooks (environment): POSTTRAIN_KILL_AFTER_CHECKPOINT=k sends SIGKILL to the process right after
checkpoint k is complete; POSTTRAIN_KILL_BEFORE_RENAME=k does so after its files are written but
before the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Optional

import torch

PREFIX = "step-"


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(PREFIX):]), default=None)


def _maybe_kill(variable: str, step: int) -> None:
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def save_trainable(model, directory: Path) -> None:
    """The trainable weights: a peft adapter directory, or the full model as safetensors."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, safe_serialization=True, selected_adapters=["default"])
    else:
        model.save_pretrained(directory, safe_serialization=True)


def load_trainable(model, directory: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        state = load_file(str(directory / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint {directory} holds weights this model does not have: {unexpected[:5]}")
    else:
        state = {}
        for file in sorted(directory.glob("*.safetensors")):
            state.update(load_file(str(file)))
        model.load_state_dict(state, strict=False)


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, rng: dict, state: dict,
                    keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_trainable(model, tmp / "adapter")
    if optimizer is not None:  # None under DeepSpeed, whose optimiser state is sharded (not yet gathered)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_plain_rng(rng), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    _maybe_kill("POSTTRAIN_KILL_BEFORE_RENAME", step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    older = sorted((p for p in root.iterdir() if p.name.startswith(PREFIX)), key=lambda p: int(p.name[len(PREFIX):]))
    for stale in older[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    _maybe_kill("POSTTRAIN_KILL_AFTER_CHECKPOINT", step)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_rng(rng: dict) -> dict:
    """RNG states as tensors and plain Python values, loadable with weights_only=True."""
    version, internal, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    return {"python": [version, list(internal), gauss], "numpy": [kind, torch.from_numpy(keys.astype("int64")),
                                                                  int(pos), int(has_gauss), float(cached)],
            "torch": rng["torch"]}


def restore_rng(saved: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    load_trainable(model, path / "adapter")
    if not (path / "optimizer.pt").is_file():
        from posttrain.errors import PosttrainError

        raise PosttrainError(f"{path} holds no optimiser state (it was written under DeepSpeed, whose sharded "
                             f"optimiser state posttrain does not gather yet), so training cannot resume exactly "
                             f"from it. Its adapter ({path / 'adapter'}) can start a new run via lora.init_adapter.")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    restore_rng(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
