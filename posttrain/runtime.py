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


def _processes_asked_of_accelerate() -> int:
    """The --num_processes of the `accelerate launch` that started this process, when accelerate's
    single-process launcher did (it sets MASTER_ADDR, not WORLD_SIZE); 1 otherwise. Linux only."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ or "MASTER_ADDR" not in os.environ:
        return 1
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 1
    if not any("accelerate" in word and "launch" in word or word == "launch" for word in words[:3]):
        return 1
    for i, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag.replace("-", "_") == "__num_processes":
            value = value or (words[i + 1] if i + 1 < len(words) else "")
            return int(value) if value.isdigit() else 1
    return 1


def make_accelerator(gradient_accumulation_steps: int, timeout_s: float | None = None):
    """An Accelerator for this launch. On CPU the process group uses gloo and the model is wrapped in
    DDP, and a launch that asked for several processes but would train on one alone is refused."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DistributedType, GradientAccumulationPlugin

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
    asked = _processes_asked_of_accelerate()
    if world == 1 and asked > 1:
        raise PosttrainError(
            f"`accelerate launch --num_processes {asked}` started one process: without GPUs, or without "
            f"--multi_gpu, accelerate runs the script once. Launch with `accelerate launch --multi_gpu "
            f"--num_processes {asked} -m posttrain train ...` (on CPU too), --use_deepspeed, or an accelerate "
            f"config file; or pass --num_processes 1 for a single-process run."
        )
    kwargs = []
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if world > 1:
        # Without an explicit gloo backend on CPU, each process would quietly train alone.
        kwargs.append(InitProcessGroupKwargs(backend="gloo" if on_cpu else None, timeout=timeout))
    if deepspeed and on_cpu:
        _skip_deepspeed_shm_build()
    plugin = GradientAccumulationPlugin(num_steps=gradient_accumulation_steps, sync_with_dataloader=False)
    # `--multi_gpu` on a CPU-only machine leaves accelerate's distributed type at NO: the process group
    # exists, but the model is not wrapped in DDP, gradients are never averaged and metrics never
    # reduced. cpu=True makes it MULTI_CPU (DeepSpeed runs set their own type).
    accelerator = Accelerator(gradient_accumulation_plugin=plugin, kwargs_handlers=kwargs,
                              cpu=world > 1 and on_cpu and not deepspeed)
    alone = accelerator.num_processes == 1 or getattr(accelerator, "distributed_type", None) == DistributedType.NO
    if world > 1 and alone:
        raise PosttrainError(
            f"WORLD_SIZE={world} but accelerate set up no data parallelism, so this process would train alone on "
            f"its own copy. Launch with `accelerate launch --multi_gpu --num_processes {world} -m posttrain train ...` "
            f"(or --use_deepspeed), or unset WORLD_SIZE for a single-process run."
        )
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        # posttrain hands DeepSpeed a torch optimiser; with offload DeepSpeed refuses it unless told
        # (its own CPU Adam would be a C++ compile). A user's DeepSpeed config file may still say otherwise.
        deepspeed_plugin.deepspeed_config.setdefault("zero_force_ds_cpu_optimizer", False)
    return accelerator


def _skip_deepspeed_shm_build() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce with the C++ compiler the first time a
    process group starts (about a minute, on every fresh machine). gloo does the same job, so
    posttrain marks the op unavailable unless POSTTRAIN_DEEPSPEED_SHM=1 asks for it."""
    if os.environ.get("POSTTRAIN_DEEPSPEED_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def seed_everything(seed: int, num_threads: int | None = None, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict:
    """Every random generator of this process: Python's, numpy's, torch's CPU one and, on a GPU, the
    current device's."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


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
