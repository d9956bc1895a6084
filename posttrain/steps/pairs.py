"""The offline step: one optimiser update on a batch of preference pairs, with any pair loss.

Per step (docs/losses.md):

1. the plan names the step's pairs; this process takes its round-robin share, cut into micro-batches
   (the same number on every process; zero-weight fillers where a short step runs out);
2. the denominators are counted over the whole step (pairs and chosen tokens, all processes), so the
   micro-batch losses add up to the step loss however the step is split;
3. per micro-batch: the pairs in the run's row layout on the device, the policy's completion log-probs,
   the reference's (precomputed once, or a no-grad pass), the paper loss on them, and its gradient
   through the coefficients c_t = -dL/dlp_t (posttrain.core.unified). The backward is scaled by
   world size x micro-batches because DDP and accelerate average those away;
4. the numbers are reduced over processes once, then the optimiser update.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional

import torch
from tqdm.auto import tqdm

from posttrain.core import StepCounts, backward_through_coefficients
from posttrain.data.layout import PairRows, build_pair_rows, shared_length
from posttrain.data.tokenize import TokenizedPair
from posttrain.errors import PosttrainError
from posttrain.eval.ranking import attention_kind, model_dtype
from posttrain.losses import LossPlugin, PairLossInputs
from posttrain.memory import out_of_memory_message
from posttrain.plan import StepPlan, shard_for_rank
from posttrain.steps.common import StepContext, StepMetrics


class PairStep:
    """Owns the training pairs, their plan and the reference log-probs; `run(step)` takes one update."""

    def __init__(self, ctx: StepContext, loss: LossPlugin, pairs: list[TokenizedPair], plan: StepPlan,
                 precompute_reference: bool, precompute_batch_size: int):
        self.ctx, self.loss, self.pairs, self.plan = ctx, loss, pairs, plan
        self.last_rows: list[list[Optional[int]]] = []  # this process's micro-batches of the latest step
        self.reference_cache = None
        if loss.needs_reference and precompute_reference:
            self.reference_cache = self._precompute_reference(precompute_batch_size)

    def run(self, step: int) -> dict:
        ctx = self.ctx
        indices = self.plan.indices(step)
        chosen_tokens = sum(len(self.pairs[i].chosen_ids) for i in indices)
        counts = StepCounts(examples=float(len(indices)), tokens=float(chosen_tokens))
        scale = ctx.world * ctx.n_micro
        metrics = StepMetrics(ctx.device)
        self.last_rows = shard_for_rank(indices, ctx.rank, ctx.world, ctx.micro_batch_size, ctx.n_micro)
        for rows in self.last_rows:
            pairs = [self.pairs[i if i is not None else 0] for i in rows]
            metrics.add("num_tokens", sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                          for p, i in zip(pairs, rows) if i is not None))
            with ctx.accelerator.accumulate(ctx.model), self._reporting_out_of_memory(step, rows, pairs):
                inputs, logps, mean_logits = self._loss_inputs(rows, pairs)
                out, coefficients = backward_through_coefficients(
                    lambda leaves: self.loss.step_loss(replace(inputs, **leaves), counts), logps,
                    lambda surrogate: ctx.accelerator.backward(surrogate * scale))
            metrics.add("loss", out.loss.item())
            metrics.add_per_example(out.metrics, inputs.pair_weight)
            for name, value in out.parts.items():
                metrics.add(name, value.item())
            weight = inputs.pair_weight[:, None]
            for side, mean_logit, mask in zip(("chosen", "rejected"), mean_logits,
                                              (inputs.chosen_mask, inputs.rejected_mask)):
                real = (mask * weight).double()
                metrics.add_mean(f"logits/{side}", (mean_logit.double() * real).sum().item(), real.sum().item())
            metrics.add_coefficients("chosen", coefficients["chosen_logps"], inputs.chosen_mask * weight,
                                     counts.examples)
            metrics.add_coefficients("rejected", coefficients["rejected_logps"], inputs.rejected_mask * weight,
                                     counts.examples)
        record = metrics.reduce(ctx.accelerator)
        where = ", ".join(f"{self.pairs[i].source} row {self.pairs[i].row}" for i in indices[:4])
        record.update(ctx.optimiser_step(record["loss"], f"batch of {len(indices)} pairs: {where}"
                                         f"{', ...' if len(indices) > 4 else ''}", step + 1, ctx.log))
        return record

    def _rows(self, pairs: list[TokenizedPair]) -> PairRows:
        """The micro-batch's pairs in the run's row layout (posttrain.data.layout), on the device."""
        ctx = self.ctx
        return build_pair_rows(pairs, ctx.pad_id, share_prompt=ctx.share_prompt, pack_tokens=ctx.pack_tokens,
                               attention=attention_kind(ctx.model), mask_dtype=model_dtype(ctx.model)).to(ctx.device)

    def _loss_inputs(self, indices: list[Optional[int]], pairs: list[TokenizedPair]):
        """Typed loss inputs of one micro-batch ([B, T] chosen and rejected tensors whatever the layout), the
        policy log-probs the core differentiates, and the per-token mean logits (chosen, rejected) for the log."""
        ctx = self.ctx
        rows = self._rows(pairs)
        with ctx.autocast():
            logps, mean_logits = ctx.model(*rows.model_inputs(), return_mean_logits=True)
        chosen, rejected = rows.split(logps)
        dtype, device = chosen.dtype, ctx.device
        ref_w = ref_l = None
        if self.loss.needs_reference:
            if self.reference_cache is not None:
                ref_w, ref_l = self._cached_reference(indices, rows, chosen)
            else:
                ref_w, ref_l = (x.to(dtype) for x in rows.split(ctx.reference_logps(rows)))
        weights = lambda w: w.to(dtype) if w is not None else None  # noqa: E731
        inputs = PairLossInputs(
            chosen_logps=chosen, rejected_logps=rejected, chosen_mask=rows.chosen_mask.to(dtype),
            rejected_mask=rows.rejected_mask.to(dtype),
            pair_weight=torch.tensor([0.0 if i is None else 1.0 for i in indices], dtype=dtype, device=device),
            ref_chosen_logps=ref_w, ref_rejected_logps=ref_l, chosen_token_weights=weights(rows.chosen_weights),
            rejected_token_weights=weights(rows.rejected_weights), extras=_numeric_extras(pairs, dtype, device))
        return inputs, {"chosen_logps": chosen, "rejected_logps": rejected}, rows.split(mean_logits)

    def _precompute_reference(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token reference log-probs of every training pair, computed once (in the training layout, pairs
        sorted by length, `batch_size` pairs per pass) and kept on the device for every epoch."""
        cache: list = [None] * len(self.pairs)
        length = shared_length if self.ctx.share_prompt else (
            lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))
        order = sorted(range(len(self.pairs)), key=lambda i: length(self.pairs[i]))
        bar = tqdm(range(0, len(order), batch_size), desc="reference log-probs",
                   disable=not self.ctx.accelerator.is_main_process)
        for start in bar:
            index = order[start:start + batch_size]
            rows = self._rows([self.pairs[i] for i in index])
            chosen, rejected = rows.split(self.ctx.reference_logps(rows))
            for j, i in enumerate(index):
                cache[i] = (chosen[j][rows.chosen_mask[j].bool()].clone(),
                            rejected[j][rows.rejected_mask[j].bool()].clone())
        return cache

    def _cached_reference(self, indices: list[Optional[int]], rows: PairRows,
                          like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached reference log-probs of the micro-batch's pairs, as [B, T] chosen and rejected tensors."""
        out = []
        for which, mask in ((0, rows.chosen_mask), (1, rows.rejected_mask)):
            values = torch.cat([self.reference_cache[i if i is not None else 0][which] for i in indices])
            out.append(like.new_zeros(mask.shape).masked_scatter(mask.bool(), values.to(like.dtype)))
        return out[0], out[1]

    @contextlib.contextmanager
    def _reporting_out_of_memory(self, step: int, rows: list[Optional[int]], pairs: list[TokenizedPair]):
        """An out-of-memory error in a micro-batch, reported with that batch's size and rows."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise PosttrainError(out_of_memory_message(step, pairs, rows, self.ctx.device)) from None


def _numeric_extras(pairs: list[TokenizedPair], dtype: torch.dtype, device: torch.device) -> dict:
    """The rows' numeric fields beside the standard ones (an offset, a soft label), as [B] tensors."""
    names = [k for k, v in pairs[0].extras.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {name: torch.tensor([float(p.extras[name]) for p in pairs], dtype=dtype, device=device) for name in names
            if all(isinstance(p.extras.get(name), (int, float)) and not isinstance(p.extras.get(name), bool)
                   for p in pairs)}
