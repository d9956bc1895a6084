"""What both steps share: the small context they run in, the optimiser update, and the one reduction of
a step's metrics over micro-batches and processes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from posttrain.data.layout import SequenceRows, build_sequence_rows
from posttrain.errors import PosttrainError
from posttrain.eval.ranking import attention_kind, model_dtype
from posttrain.models import Reference
from posttrain.zero import zero_stage


class OptimiserStep:
    """Clip, then take the optimiser and scheduler step, unless the loss or the gradient norm is not finite
    (then stop or skip, per train.on_nonfinite). Every process sees the same reduced loss and global norm,
    so all decide alike."""

    def __init__(self, accelerator, model, optimizer, scheduler, max_grad_norm: Optional[float], on_nonfinite: str):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.max_grad_norm, self.on_nonfinite = max_grad_norm, on_nonfinite

    def __call__(self, loss: float, where: str, step_number: int, log) -> dict:
        """Returns grad_norm, learning_rate (and skipped)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm is not None
                                                else float("inf"))
        grad_norm = float(norm) if norm is not None else float("nan")
        record = {"grad_norm": grad_norm, "learning_rate": self.scheduler.get_last_lr()[0]}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            message = f"step {step_number}: the loss is {loss} and the gradient norm {grad_norm} ({where})."
            if self.on_nonfinite == "stop":
                raise PosttrainError(message + " Stopping: lower train.lr, check those rows, or set "
                                               "train.on_nonfinite: skip to skip such steps.")
            if zero_stage(self.accelerator) is not None:
                raise PosttrainError(message + " Stopping although train.on_nonfinite is skip: under DeepSpeed "
                                               "the engine applies the update inside the last backward pass, so "
                                               "this step cannot be skipped. Lower train.lr or check those rows, "
                                               "and resume from the last checkpoint.")
            log.warning("%s Skipping the update (train.on_nonfinite: skip).", message)
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = 1.0
            return record
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return record


@dataclass
class StepContext:
    """Everything a step needs from the run, and nothing else: the accelerator and the prepared model
    (a PolicyLogProbs), the peft model inside it, the reference, the precision, the optimiser update and the
    batch geometry. `device` is where every micro-batch and every tensor a step creates goes."""

    accelerator: Any
    model: Any
    peft_model: Callable[[], Any]
    reference: Reference
    optimiser_step: OptimiserStep
    bf16: bool
    pad_id: int
    micro_batch_size: int
    n_micro: int
    share_prompt: bool
    pack_tokens: Optional[int]
    log: Any
    timings: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def rows(self, sequences: list[tuple[list[int], list[int]]], shared_by: Optional[list[int]]) -> SequenceRows:
        """Sequences in the run's row layout (posttrain.data.layout), on the device."""
        return build_sequence_rows(sequences, self.pad_id, shared_by=shared_by if self.share_prompt else None,
                                   pack_tokens=self.pack_tokens, attention=attention_kind(self.model),
                                   mask_dtype=model_dtype(self.model)).to(self.device)

    def reference_logps(self, rows: SequenceRows, temperature: float = 1.0) -> torch.Tensor:
        with self.autocast():
            return self.reference.log_probs(self.model, self.peft_model(), *rows.model_inputs(), temperature=temperature)


class StepMetrics:
    """A step's numbers, summed over its micro-batches here and over processes in one reduction: sums
    (losses, already globally normalised), weighted means (per-example metrics, coefficient means), maxima
    and minima. A per-example metric named `..._max` or `..._min` is the maximum or minimum over the
    step's real examples instead of their mean (TRL's clip_ratio/high_max, clip_ratio/low_min)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, float] = {}
        self.means: dict[str, list[float]] = {}  # name -> [weighted sum, weight]
        self.maxima: dict[str, float] = {}  # a minimum is kept as the maximum of the negated values
        self.minima: set[str] = set()

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def add_mean(self, name: str, total: float, weight: float) -> None:
        entry = self.means.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(weight)

    def add_max(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, -math.inf), float(value))

    def add_min(self, name: str, value: float) -> None:
        self.minima.add(name)
        self.add_max(name, -value)

    def add_per_example(self, values: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        weight = weight.double()
        for name, value in values.items():
            value = value.double().reshape(-1)
            real = value[weight > 0]
            if name.endswith("_max") and real.numel():
                self.add_max(name, real.max().item())
            elif name.endswith("_min") and real.numel():
                self.add_min(name, real.min().item())
            elif not name.endswith(("_max", "_min")):
                self.add_mean(name, (value * weight).sum().item(), weight.sum().item())

    def add_coefficients(self, name: str, coefficient: torch.Tensor, mask: torch.Tensor, examples: float) -> None:
        """Mean and max |c| over the masked tokens, in per-example units (c times the step's example count)."""
        values = (coefficient.double().abs() * examples)[mask.bool()]
        self.add_mean(f"coef/{name}_mean_abs", values.sum().item(), values.numel())
        self.add_max(f"coef/{name}_max_abs", values.max().item() if values.numel() else 0.0)

    def reduce(self, accelerator) -> dict:
        sums, means, maxima = sorted(self.sums), sorted(self.means), sorted(self.maxima)
        flat = [self.sums[n] for n in sums] + [v for n in means for v in self.means[n]]
        totals = torch.tensor(flat, dtype=torch.float64, device=self.device)
        peaks = torch.tensor([self.maxima[n] for n in maxima], dtype=torch.float64, device=self.device)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
            if maxima:
                torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        totals, peaks = totals.cpu().tolist(), peaks.cpu().tolist()
        out = dict(zip(sums, totals[:len(sums)]))
        for k, name in enumerate(means):
            total, weight = totals[len(sums) + 2 * k], totals[len(sums) + 2 * k + 1]
            out[name] = total / max(weight, 1e-12)
        out.update((name, -peak if name in self.minima else peak) for name, peak in zip(maxima, peaks))
        return out
