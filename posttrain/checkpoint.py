"""Checkpoints that survive a kill at any moment and resume on any number of processes.

Layout: <output_dir>/checkpoints/step-00000010/ with
  adapter/                      LoRA adapter in peft format (safetensors), or model.safetensors without LoRA
  trainable_state.safetensors   whole trainable parameters (LoRA) and optimiser state, keyed by
  trainable_state.json          parameter name, with the scalars: see posttrain.distributed
  scheduler.pt, rng.pt          read back with torch.load(weights_only=True)
  trainer_state.json            step, data position, recipe, metrics so far
Nothing in it depends on the number of processes or the backend that wrote it. The exception is
full fine-tuning under DeepSpeed: there each process writes its own partition in DeepSpeed's format
(deepspeed/, no adapter/ or safetensors), resumable only with the same ZeRO stage and number of
processes, and loaded only from the run's own checkpoints (DeepSpeed unpickles it with
weights_only=False). A checkpoint is
written to a temporary directory and renamed into place: a directory named `step-*` is complete,
whatever moment the process died at. Only one process writes (apart from deepspeed/).

Callbacks (posttrain.callbacks) see a checkpoint after its files are written and before the rename
(`before_checkpoint_rename`), and once it is complete (`on_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
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


def save_trainable(model, directory: Path) -> None:
    """The trainable weights: a peft adapter directory, or the full model as safetensors."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, safe_serialization=True, selected_adapters=["default"])
    else:
        model.save_pretrained(directory, safe_serialization=True)


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is written before its rename (the same path on every process)."""
    return checkpoint_root(output_dir) / f".tmp-{PREFIX}{step:08d}"


def prepare_staging(output_dir: Path, step: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    staging = staging_dir(output_dir, step)
    staging.mkdir()
    return staging


def save_checkpoint(output_dir: Path, step: int, model, training_state: tuple[dict, dict], scheduler,
                    rngs: list[dict], state: dict, keep_last: int, callbacks=()) -> Path:
    """Write checkpoint `step` (see the module docstring) into its prepared staging directory, which
    may already hold DeepSpeed's own files, and rename it into place. `training_state` is the (tensors,
    meta) of posttrain.distributed; `model` None writes no adapter/ (DeepSpeed's files hold the model);
    `rngs` holds every process's RNG state (processes sample differently, e.g. online rollouts)."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = staging_dir(output_dir, step)
    if model is not None:
        save_trainable(model, tmp / "adapter")
    tensors, meta = training_state
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainable_state.safetensors"))
    (tmp / "trainable_state.json").write_text(json.dumps(meta, indent=1))
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"per_process": [_plain_rng(rng) for rng in rngs]}, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    for callback in callbacks:
        callback.before_checkpoint_rename(step, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    older = sorted((p for p in root.iterdir() if p.name.startswith(PREFIX)), key=lambda p: int(p.name[len(PREFIX):]))
    for stale in older[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    for callback in callbacks:
        callback.on_checkpoint(step, final)
    return final


def save_final(model, tokenizer, output_dir: Path, base_model: str, base_note: str = "") -> Path:
    """<output_dir>/final: the trained adapter (or model) and tokenizer, renamed into place whole. An
    adapter names `base_model` as its base_model_name_or_path, and its README gets `base_note`."""
    final = Path(output_dir) / "final"
    for stale in Path(output_dir).glob(".tmp-final-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(output_dir) / f".tmp-final-{os.getpid()}"
    save_trainable(model, tmp)
    tokenizer.save_pretrained(tmp)
    adapter_config = tmp / "adapter_config.json"
    if adapter_config.is_file():
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))
        readme = tmp / "README.md"
        if base_note:
            card = readme.read_text() if readme.is_file() else ""
            readme.write_text(card.rstrip("\n") + f"\n\n## Base model\n\n{base_note}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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
            "torch": rng["torch"], "cuda": rng.get("cuda")}


def restore_rng(saved: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def read_checkpoint(path: Path, scheduler, rank: int = 0) -> tuple[dict, dict, dict]:
    """(tensors, meta, trainer state) of checkpoint `path`, with the scheduler and process `rank`'s RNG
    restored (on another number of processes, process r takes the state of process r mod saved). The
    tensors hold every trainable parameter under `param/<name>`, also for full fine-tuning (read from
    adapter/), so that posttrain.distributed.restore_training_state puts everything back in one place."""
    from safetensors.torch import load_file

    from posttrain.errors import PosttrainError

    if not (path / "trainable_state.json").is_file():
        raise PosttrainError(f"{path} holds no trainable_state.json (it was written by an earlier posttrain "
                             f"version), so training cannot resume exactly from it. Its adapter "
                             f"({path / 'adapter'}) can start a new run via lora.init_adapter.")
    meta = json.loads((path / "trainable_state.json").read_text())
    native = meta.get("deepspeed_native", False)
    tensors = {} if native else load_file(str(path / "trainable_state.safetensors"))
    if not native and not any(k.startswith("param/") for k in tensors):
        for file in sorted((path / "adapter").glob("*.safetensors")):
            tensors.update({f"param/{k}": v for k, v in load_file(str(file)).items()})
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rngs = torch.load(path / "rng.pt", weights_only=True)["per_process"]
    restore_rng(rngs[rank % len(rngs)])
    return tensors, meta, json.loads((path / "trainer_state.json").read_text())
