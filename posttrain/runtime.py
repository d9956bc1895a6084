"""Process set-up: accelerate (gloo on CPU), seeds, threads, determinism, and the run record."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from posttrain.errors import PosttrainError

RECORDED_PACKAGES = ["torch", "transformers", "peft", "accelerate", "datasets", "trl", "deepspeed", "posttrain"]


def make_accelerator(gradient_accumulation_steps: int, timeout_s: float | None = None):
    """An Accelerator for this launch. On CPU the process group uses gloo, and a launch that asked for
    several processes but got one is refused instead of training alone."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import GradientAccumulationPlugin

    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("POSTTRAIN_PG_TIMEOUT", 1800)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world > 1 and missing:
        raise PosttrainError(
            f"WORLD_SIZE={world} is set, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: this "
            f"process was not started by a distributed launcher and would train alone. Launch with "
            f"`accelerate launch --multi_gpu --num_processes {world} -m posttrain train ...` (on CPU too) or torchrun, "
            f"or unset WORLD_SIZE for a single-process run."
        )
    kwargs = []
    if world > 1:
        # Without an explicit gloo backend on CPU, each process would quietly train alone.
        backend = "gloo" if not torch.cuda.is_available() else None
        kwargs.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    plugin = GradientAccumulationPlugin(num_steps=gradient_accumulation_steps, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin, kwargs_handlers=kwargs)
    if world > 1 and accelerator.num_processes == 1:
        raise PosttrainError(
            f"WORLD_SIZE={world} but accelerate set up a single process, so this process would train alone on "
            f"its own copy. Launch with `accelerate launch --multi_gpu --num_processes {world} -m posttrain train ...` "
            f"(or --use_deepspeed), or unset WORLD_SIZE for a single-process run."
        )
    return accelerator


def seed_everything(seed: int, num_threads: int | None = None, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_record(output_dir: Path, recipe_dict: dict, seed: int, world_size: int) -> None:
    import yaml

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    record = {
        "seed": seed,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world_size,
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    (output_dir / "run.json").write_text(json.dumps(record, indent=2))
