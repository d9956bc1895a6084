"""Training state that does not depend on how many processes hold it.

A checkpoint must resume on any number of processes and under any backend (one process, DDP,
ZeRO-1/2/3), so posttrain never writes an optimiser's own state_dict: that is keyed by position,
and under DeepSpeed each process holds only its partition of a flat fp32 buffer. Instead, for
every trainable parameter *name*, the whole parameter and its whole optimiser state tensors
(`exp_avg`, `exp_avg_sq`, `momentum_buffer`) are gathered, and one process writes them as
safetensors, with the scalars (Adam's `step`) and the parameter-group hyperparameters as JSON.
Restoring is the reverse: every process reads the files and hands its engine the whole tensors;
DeepSpeed keeps its own partition of them.

Under DeepSpeed the gathers (`safe_get_full_*`) are collectives: every process must call these
functions, for the same parameters in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.zero import gathered, zero_stage

PARAM_KEY = "param"  # safetensors key prefix of the parameter values themselves


@dataclass
class TrainingState:
    """What a checkpoint gathers and restores: the prepared model (a DeepSpeed engine under DeepSpeed), the
    peft model inside it, the torch optimiser and scheduler, and the process group's size."""

    accelerator: Any
    model: Any
    peft_model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    output_dir: Path

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def named_trainable(peft_model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter; the names are those of the unwrapped model, so
    they are the same whatever wraps it (DDP, a DeepSpeed engine) and however many processes run."""
    return [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]


def _deepspeed_optimizers(model):
    """(DeepSpeed's ZeRO optimiser, the torch optimiser inside it that steps the flat fp32 partitions)."""
    zero_optimizer = model.optimizer  # `model` is the DeepSpeedEngine accelerate returned
    return zero_optimizer, zero_optimizer.optimizer


def _first_state(optimizer) -> dict:
    return next(iter(optimizer.state.values()), {})


def _split_state(entry: dict) -> tuple[list[str], dict[str, float]]:
    """The tensor-valued keys of one parameter's optimiser state, and its scalars (`step`)."""
    tensors = sorted(k for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0)
    scalars = {k: float(v) for k, v in entry.items()
               if (torch.is_tensor(v) and v.dim() == 0) or isinstance(v, (int, float))}
    return tensors, scalars


def _group_hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, list, tuple))}
            for group in optimizer.param_groups]


def gather_training_state(state: TrainingState, with_parameters: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole trainable parameters (if asked) and optimiser state, keyed `<kind>/<parameter name>`,
    plus the JSON-able rest. A collective under DeepSpeed: every process calls it; all get the result."""
    stage = zero_stage(state.accelerator)
    params = named_trainable(state.peft_model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    if stage is None:
        optimizer = state.optimizer
        for name, p in params:
            if with_parameters:
                tensors[f"{PARAM_KEY}/{name}"] = p.detach().cpu().clone()
            keys, scalars[name] = _split_state(optimizer.state.get(p, {}))
            for key in keys:
                tensors[f"{key}/{name}"] = optimizer.state[p][key].detach().cpu().clone()
    else:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        _, inner = _deepspeed_optimizers(state.model)
        keys, step_scalars = _split_state(_first_state(inner))  # one flat buffer per group: same for all
        for name, p in params:
            if with_parameters:
                tensors[f"{PARAM_KEY}/{name}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in keys:
                tensors[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
            scalars[name] = dict(step_scalars)
    meta = {"scalars": scalars, "param_groups": _group_hyperparameters(state.optimizer),
            "world_size": state.world, "zero_stage": stage}
    return tensors, meta


def follow_current_schedule(scheduler, lr: float) -> None:
    """Set the learning rate to what this run's schedule gives at the restored step: lr * lambda(step).
    With an unchanged recipe that is the checkpoint's value exactly; after `--force` with a new
    `train.max_steps`, warm-up or `train.lr` it is the rebuilt schedule's, not the old run's last value."""
    scheduler.base_lrs = [lr] * len(scheduler.optimizer.param_groups)
    for group, scale in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * scale(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def restore_training_state(state: TrainingState, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what `gather_training_state` wrote into this run's model and optimiser, whatever the
    number of processes or the backend it was written under. Every process calls it."""
    stage = zero_stage(state.accelerator)
    params = named_trainable(state.peft_model)
    missing = [name for name, _ in params if name not in meta["scalars"]]
    if missing:
        from posttrain.errors import PosttrainError

        raise PosttrainError(f"the checkpoint has no state for {len(missing)} trainable parameters of this model "
                             f"(e.g. {missing[0]}): it was written for a different model or LoRA set-up.")
    keys = sorted({k.split("/", 1)[0] for k in tensors} - {PARAM_KEY})
    for group, saved in zip(state.optimizer.param_groups, meta["param_groups"]):
        group.update({k: v for k, v in saved.items() if k in group})
    if stage is None:
        optimizer = state.optimizer
        for name, p in params:
            if f"{PARAM_KEY}/{name}" in tensors:
                p.data.copy_(tensors[f"{PARAM_KEY}/{name}"])
            entry = {key: tensors[f"{key}/{name}"].to(p.dtype).clone() for key in keys}
            entry.update({k: torch.tensor(v, dtype=torch.float32) for k, v in meta["scalars"][name].items()})
            if entry:
                optimizer.state[p] = entry
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero_optimizer, inner = _deepspeed_optimizers(state.model)
    step_scalars = meta["scalars"][params[0][0]] if params else {}
    flat_partitions = (zero_optimizer.fp32_partitioned_groups_flat if stage == 3
                       else zero_optimizer.single_partition_of_fp32_groups)
    for flat in flat_partitions if keys or step_scalars else []:  # torch creates state lazily, at the first step
        entry = inner.state.setdefault(flat, {})
        for key in keys:
            entry.setdefault(key, torch.zeros_like(flat))
        entry.update({k: torch.tensor(v, dtype=torch.float32) for k, v in step_scalars.items()})
    if stage < 3 and keys:
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()  # point each parameter at its state fragment
    with gathered([p for _, p in params], stage, modifier_rank=0):  # the copies the forward pass uses
        if stage < 3 or state.accelerator.is_main_process:
            for name, p in params:
                if f"{PARAM_KEY}/{name}" in tensors:
                    p.data.copy_(tensors[f"{PARAM_KEY}/{name}"])
    for name, p in params:  # DeepSpeed's fp32 master copies and optimiser state
        if f"{PARAM_KEY}/{name}" in tensors:
            safe_set_full_fp32_param(p, tensors[f"{PARAM_KEY}/{name}"].float())
        for key in keys:
            safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].float(), key)


def gather_objects(world: int, value) -> list:
    """`value` of every process, in rank order, on every process."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def native_checkpoint_meta(state: TrainingState) -> dict:
    return {"deepspeed_native": True, "world_size": state.world, "zero_stage": zero_stage(state.accelerator)}


def load_native_checkpoint(state: TrainingState, path: Path, meta: dict) -> None:
    """Resume full fine-tuning from DeepSpeed's own partitions in `path`/deepspeed, which only the same
    ZeRO stage on the same number of processes can read. DeepSpeed unpickles these files
    (torch.load with weights_only=False): posttrain loads them only from the run's own checkpoints."""
    from posttrain.errors import PosttrainError

    here = (state.world, zero_stage(state.accelerator))
    there = (meta["world_size"], meta["zero_stage"])
    if here != there:
        raise PosttrainError(f"{path} is a full fine-tuning checkpoint in DeepSpeed's own sharded format, written "
                             f"under ZeRO-{there[1]} on {there[0]} processes; it resumes only with the same "
                             f"(now: {'ZeRO-' + str(here[1]) if here[1] is not None else 'no DeepSpeed'} on "
                             f"{here[0]}). Relaunch with that config, or start a new run from the final model.")
    if Path(path).resolve().parent != (Path(state.output_dir) / "checkpoints").resolve():
        raise PosttrainError(f"{path}: DeepSpeed checkpoints are loaded only from the run's own checkpoints/.")
    loaded, _ = state.model.load_checkpoint(str(Path(path) / "deepspeed"), tag="engine",
                                              load_lr_scheduler_states=False)
    if loaded is None:
        raise PosttrainError(f"{path}/deepspeed: DeepSpeed found no checkpoint to load (incomplete copy?).")
