"""The online step: one rollout batch of groups and its `rollout.updates_per_batch` updates, with any group loss.

Per step (docs/online_rl.md):

1. the sampler picks B prompts (on process 0, broadcast to the others);
2. each process generates G completions for its share of the prompts and scores them; every process then
   holds the whole rollout batch (posttrain.rollout.collect);
3. with `rollout.filter_zero_variance`, groups whose reward std is at most `zero_variance_eps` are dropped
   and more prompts are rolled out, up to `max_resample_rounds` times; then the step goes on with what it has;
4. the sampler learns which prompts were solved (a success = the designated reward component at or above
   the threshold);
5. `loss.compute_advantages` runs once on the whole rollout batch, before it is split;
6. each process trains on its own whole groups, `train.micro_batch_size` groups per forward/backward, with
   the step's global counts (completions and completion tokens), the gradient through the coefficients
   c_t = -dL/dlp_t (posttrain.core.unified). pi_old comes from a no-grad pass over the rollout tokens
   (logits / temperature, dropout off) when there is more than one update or the recipe asks for it;
   with one update it is the current policy detached, so the ratio is exactly 1.

With `rollout.max_staleness: 1` (one-step off-policy), step k trains on rollouts that policy version k-1
sampled: at the end of step k-1's collection the next batch's prompts are chosen and rolled out, on a
background thread while step k-1 trains when the engine holds its own weights (vllm, vllm_server), else at
once on the training model (hf: no overlap, the same data). Each record carries the version that sampled it;
pi_old of a stale record is the trainer's forward with that version's trainable weights (kept as a snapshot),
so the importance ratio is against the policy that sampled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import RolloutConfig
from posttrain.core import StepCounts, backward_through_coefficients
from posttrain.core.mismatch import mismatch_weights
from posttrain.errors import RecipeError
from posttrain.losses import GroupLossInputs, LossPlugin, RolloutBatch
from posttrain.plan import split_groups
from posttrain.rollout import RolloutCollector, RolloutRecord, RolloutStats, SamplingParams
from posttrain.rollout.batch import completion_tensors, engine_logprob_tensor, group_reward_std, rollout_metrics
from posttrain.steps.common import StepContext, StepMetrics
from posttrain.steps.offpolicy import NextBatch, WeightSnapshot
from posttrain.steps.online_setup import broadcast, gather_objects


class GroupStep:
    """Owns the sampler and the rollout collector; `run(step)` rolls out one batch and updates on it. With
    `completions_log` (process 0 with `logging.completions`), every rollout is appended there as a JSON line."""

    def __init__(self, ctx: StepContext, loss: LossPlugin, sampler, collector: RolloutCollector,
                 rollout: RolloutConfig, batch_size: int, params: SamplingParams, total_steps: int,
                 completions_log: Optional[Path] = None):
        self.ctx, self.loss, self.sampler, self.collector = ctx, loss, sampler, collector
        self.rollout, self.batch_size, self.params = rollout, batch_size, params
        self.total_steps, self.completions_log = total_steps, completions_log
        self.next_batch: Optional[NextBatch] = None  # max_staleness 1: the next step's rollouts, started
        self.snapshots: dict[int, WeightSnapshot] = {}  # trainable weights of the versions that sampled them

    def run(self, step: int) -> dict:
        ctx, ro = self.ctx, self.rollout
        record: dict = {}
        t0 = time.time()
        collected = self.collect(step, record)
        records, prepared = self.loss.prepare_rollouts(collected)
        record.update(prepared)
        if self.completions_log is not None:
            self.log_completions(step, collected, records)
        record["time/rollout"] = time.time() - t0
        if not records:
            ctx.log.warning("step %d: every group had zero reward variance after %d resampling rounds; no update",
                            step + 1, ro.max_resample_rounds)
            return {**record, "loss": 0.0, "skipped": 1.0, "num_tokens": 0.0}
        token_ids, mask = completion_tensors(records, ro.truncated == "mask")
        engine_logps = engine_logprob_tensor(records, mask.shape[1])
        if mask.sum() == 0:
            ctx.log.warning("step %d: every completion was truncated and rollout.truncated is 'mask', so no token "
                            "is left to train on; no update. Raise rollout.max_new_tokens.", step + 1)
            return {**record, "loss": 0.0, "skipped": 1.0, "num_tokens": 0.0}
        group_of = torch.tensor([rec.group for rec in records], device="cpu")
        groups = sorted(set(group_of.tolist()))
        rows_of = {g: [i for i, rec in enumerate(records) if rec.group == g] for g in groups}
        # Always the configured number of micro-batches (fillers when the filter left fewer groups): accelerate and
        # DeepSpeed count micro-batches to find the accumulation boundary.
        micro = split_groups(groups, ctx.world, ctx.rank, ctx.micro_batch_size, ctx.n_micro)
        t1 = time.time()
        old_logps, entropy = {}, None
        stale = any(rec.policy_version != step for rec in records)
        if ro.updates_per_batch > 1 or ro.recompute_old_logprobs or self.loss.needs_sampling_entropy or stale:
            old_logps, entropy = self.sampling_pass(records, rows_of, micro, mask.shape[1], step)
        self.snapshots.clear()
        record["time/old_logprobs"] = time.time() - t1
        batch = RolloutBatch(rewards=torch.tensor([rec.reward for rec in records], dtype=torch.float64, device="cpu"),
                             group_index=group_of, mask=mask, token_ids=token_ids, entropy=entropy,
                             answers=[rec.answer for rec in records],
                             extras={"demonstration": torch.tensor([rec.demonstration for rec in records],
                                                                   device="cpu"), "engine_logps": engine_logps})
        try:
            advantages = self.loss.compute_advantages(batch)
        except ValueError as exc:  # a plug-in's word on a batch the recipe shaped (e.g. COPO with one prompt)
            raise RecipeError(f"loss {self.loss.name!r} cannot use the rollout batch of step {step + 1} "
                              f"({len(groups)} prompts x {ro.group_size} completions): {exc} Adjust train.batch_size "
                              f"or the rollout settings.") from None
        counts = StepCounts(examples=float(len(records)), tokens=float(mask.sum().item()))
        t2 = time.time()
        for update in range(ro.updates_per_batch):
            out = self.update(step, records, rows_of, micro, batch, advantages, old_logps, counts)
            if update == 0:
                record.update(out)
            else:
                record.update({f"update{update + 1}/{k}": v for k, v in out.items() if k in ("loss", "grad_norm")})
        record["time/train"] = time.time() - t2
        record["num_tokens"] = float(sum(len(rec.prompt_ids) + len(rec.completion_ids) for rec in records))
        return record

    # ------------------------------------------------------------------------------------------ rollouts
    def collect(self, step: int, metrics: dict) -> list[RolloutRecord]:
        """The step's rollout batch, after the zero-variance filter and its resampling rounds; the sampler is
        updated with every group that was rolled out."""
        ro, ctx = self.rollout, self.ctx
        stats = RolloutStats()
        started, self.next_batch = self.next_batch, None
        kept: list[RolloutRecord] = []
        used: set[int] = set()
        next_group, rounds, zero_var_groups, rolled_groups = 0, 0, 0, 0
        while True:
            if started is not None:  # the first round, rolled out during the last step
                indices, records = started.indices, self.collector.finish(started.future, stats)
                self.snapshots[started.version] = started.snapshot
                started = None
                self.collector.engine.sync_weights(ctx.peft_model())
            else:
                self.collector.engine.sync_weights(ctx.peft_model())
                indices = self._select(self.batch_size - len({rec.group for rec in kept}), used)
                records = self.collector.collect(indices, ro.group_size, self.params, next_group, stats, step)
            used.update(indices)
            next_group += len(indices)
            self._update_sampler(records)
            stds = group_reward_std(records)
            zero = {g for g, s in stds.items() if s <= ro.zero_variance_eps}
            zero_var_groups += len(zero)
            rolled_groups += len(stds)
            if rounds == 0:
                metrics.update(rollout_metrics(records, zero, len(stds)))
            kept += [rec for rec in records if not (ro.filter_zero_variance and rec.group in zero)]
            groups_kept = len({rec.group for rec in kept})
            if not ro.filter_zero_variance or groups_kept >= self.batch_size or rounds >= ro.max_resample_rounds:
                break
            rounds += 1
        if ro.filter_zero_variance:
            metrics.update({"filter/resample_rounds": float(rounds), "filter/groups": float(groups_kept),
                            "filter/dropped_groups": float(zero_var_groups),
                            "filter/rolled_out_groups": float(rolled_groups)})
            if groups_kept < self.batch_size:
                ctx.log.info("step %d: %d of %d groups have reward variance after %d resampling rounds; training "
                             "on them", step + 1, groups_kept, self.batch_size, rounds)
        metrics.update({"time/generation": stats.generation_seconds, "time/rewards": stats.reward_seconds,
                        "time/gather": stats.gather_seconds, **self.collector.engine.metrics(),
                        "rollout/staleness": sum(step - rec.policy_version for rec in kept) / max(len(kept), 1)})
        if ro.max_staleness and step + 1 < self.total_steps:
            self.next_batch = self.start_next_batch(step)
        return kept

    def start_next_batch(self, step: int) -> "NextBatch":
        """Choose step + 1's prompts now and start rolling them out with policy version `step` (the engine was
        synced to it above), keeping that version's trainable weights for the pi_old of those completions."""
        indices = self._select(self.batch_size, set())
        snapshot = WeightSnapshot(self.ctx.peft_model())
        future = self.collector.start(indices, self.rollout.group_size, self.params, 0, step,
                                      background=self.collector.engine.concurrent)
        return NextBatch(indices, step, snapshot, future)

    def settle(self) -> None:
        """Wait until a background rollout has finished (before an evaluation uses the engine and the rewards)."""
        if self.next_batch is not None:
            concurrent.futures.wait([self.next_batch.future])

    def close(self) -> None:
        self.settle()
        self.collector.close()

    def log_completions(self, step: int, collected: list[RolloutRecord], trained: list[RolloutRecord]) -> None:
        """One JSON line per rollout: its prompt, completion, reward and how its group was trained (`rl`; `sft` when
        the loss replaced the group by its gold demonstration, as HPT does; `none` when it left the group out)."""
        sft = {rec.group for rec in trained if rec.demonstration}
        rl = {rec.group for rec in trained if not rec.demonstration}
        with self.completions_log.open("a", encoding="utf-8") as handle:
            for rec in collected:
                example = self.collector.examples[rec.index]
                handle.write(json.dumps({
                    "step": step + 1, "prompt_index": rec.index, "source": example.source, "row": example.row,
                    "group": rec.group, "prompt": example.prompt, "completion": rec.text, "answer": rec.answer,
                    "reward": rec.reward, "success": rec.success, "truncated": rec.truncated,
                    "trained_by": "sft" if rec.group in sft else "rl" if rec.group in rl else "none"}) + "\n")

    def _select(self, count: int, exclude: set[int]) -> list[int]:
        """`count` dataset indices from the sampler, chosen on process 0 and broadcast; indices already in the
        step are left out (the batch may then be smaller)."""
        chosen = None
        if self.ctx.rank == 0:
            chosen = [i for i in self.sampler.select(min(count, self.sampler.num_items)) if i not in exclude]
        return broadcast(chosen) if self.ctx.world > 1 else chosen

    def _update_sampler(self, records: list[RolloutRecord]) -> None:
        """Every process updates its sampler with the same gathered records, so their states stay equal."""
        successes: dict[int, float] = {}
        for rec in records:
            successes[rec.index] = successes.get(rec.index, 0.0) + float(rec.success)
        if successes:
            self.sampler.update(list(successes), list(successes.values()), self.rollout.group_size)

    # ------------------------------------------------------------------------------------------ training
    def _forward(self, records, rows, slots, width, reference=False):
        """Completion log-probs [len(rows), width] on the device (and per-token entropy, None for the reference)."""
        ctx = self.ctx
        layout = ctx.rows([(records[i].prompt_ids, records[i].completion_ids) for i in rows], slots)
        temperature = self.rollout.temperature
        if reference:
            dense, ent = ctx.reference_logps(layout, temperature), None
        else:
            with ctx.autocast():
                dense, ent = ctx.model(*layout.model_inputs(), temperature=temperature, return_entropy=True)

        def completion(values):
            out = layout.gather(values)
            return torch.nn.functional.pad(out, (0, width - out.shape[1]))

        return completion(dense), completion(ent) if ent is not None else None

    @torch.no_grad()
    def sampling_pass(self, records, rows_of, micro, width, step: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """pi_old log-probs of this process's rows (in the training micro-batch layout, so with one update the
        ratio is exactly 1) and the sampling policy's per-token entropy of every completion (gathered). A record
        an earlier policy version sampled gets that version's log-probs (its weight snapshot swapped in)."""
        model = self.ctx.model
        was_training = model.training
        model.eval()
        old: dict[int, torch.Tensor] = {}
        mine_entropy: dict[int, list[float]] = {}
        try:
            for version in sorted({rec.policy_version for rec in records}):
                weights_of_version = (contextlib.nullcontext() if version == step
                                      else self.snapshots[version].swapped_in())
                with weights_of_version:
                    for groups in micro:
                        rows, weights, slots = micro_batch_rows(rows_of, groups)
                        if not any(w > 0 and records[i].policy_version == version for i, w in zip(rows, weights)):
                            continue
                        logps, entropy = self._forward(records, rows, slots, width)
                        for k, (i, w) in enumerate(zip(rows, weights)):
                            if w > 0 and records[i].policy_version == version:
                                old[i] = logps[k].detach().clone()
                                mine_entropy[i] = entropy[k].float().tolist()
        finally:
            model.train(was_training)
        full = torch.zeros((len(records), width), dtype=torch.float64, device="cpu")
        for part in gather_objects([mine_entropy]) if self.ctx.world > 1 else [mine_entropy]:
            for i, values in part.items():
                full[i] = torch.tensor(values, dtype=torch.float64, device="cpu")
        return old, full

    def update(self, step, records, rows_of, micro, batch: RolloutBatch, advantages, old_logps,
               counts: StepCounts) -> dict:
        """Forward/backward over this process's micro-batches of whole groups, then one optimiser update."""
        ctx, ro = self.ctx, self.rollout
        device, scale, width = ctx.device, ctx.world * len(micro), batch.mask.shape[1]
        metrics = StepMetrics(device)
        for groups in micro:
            rows, weights, slots = micro_batch_rows(rows_of, groups)
            index = torch.tensor(rows, device="cpu")
            with ctx.accelerator.accumulate(ctx.model):
                logps, entropy = self._forward(records, rows, slots, width)
                dtype = logps.dtype
                on_device = lambda x: x[index].to(device=device, dtype=dtype)  # noqa: E731
                weight = torch.tensor(weights, dtype=dtype, device=device)
                ref = self._forward(records, rows, slots, width, reference=True)[0].to(dtype) \
                    if self.loss.needs_reference else None
                old = torch.stack([old_logps[i] if w > 0 else logps[k].detach() for k, (i, w) in
                                   enumerate(zip(rows, weights))]).to(dtype) if old_logps else None
                pi_old = old if old is not None else logps.detach()
                engine = batch.extras["engine_logps"][index].to(device=device, dtype=dtype)
                mismatch = mismatch_weights(pi_old, torch.where(torch.isnan(engine), pi_old, engine),
                                            on_device(batch.mask) * weight[:, None], ro.mismatch.correction,
                                            ro.mismatch.level, ro.mismatch.cap)
                inputs = GroupLossInputs(
                    logps=logps, mask=on_device(batch.mask), advantages=advantages[index].to(device),
                    completion_weight=weight, old_logps=old, ref_logps=ref,
                    entropy=on_device(batch.entropy) if batch.entropy is not None else None,
                    token_ids=batch.token_ids[index].to(device), group_index=batch.group_index[index].to(device),
                    rewards=on_device(batch.rewards))
                out, coefficients = backward_through_coefficients(
                    lambda leaves: self.loss.step_loss(replace(inputs, **leaves), counts), {"logps": logps},
                    lambda surrogate: ctx.accelerator.backward(surrogate * scale),
                    {"logps": mismatch.weights} if ro.mismatch.correction != "none" else None)
            metrics.add("loss", out.loss.item())
            metrics.add_mean("mismatch/log_ratio_mean", mismatch.delta_sum, mismatch.tokens)
            metrics.add_max("mismatch/log_ratio_abs_max", mismatch.delta_abs_max)
            metrics.add_mean("mismatch/above_cap_share", mismatch.above_cap, mismatch.tokens)
            metrics.add_mean("mismatch/outside_band_share", mismatch.outside_band, mismatch.tokens)
            metrics.add_per_example(out.metrics, weight)
            for name, value in out.parts.items():
                metrics.add(name, value.item())
            real = inputs.mask * weight[:, None]
            metrics.add_mean("entropy", (entropy.double() * real.double()).sum().item(), real.sum().item())
            pushed_up = (coefficients["logps"] * real).sum(-1) > 0
            metrics.add_coefficients("positive", coefficients["logps"], real * pushed_up[:, None], counts.examples)
            metrics.add_coefficients("negative", coefficients["logps"], real * ~pushed_up[:, None], counts.examples)
        record = metrics.reduce(ctx.accelerator)
        indices = sorted({rec.index for rec in records})
        where = f"groups of prompts {indices[:6]}{' ...' if len(indices) > 6 else ''}"
        record.update(ctx.optimiser_step(record["loss"], where, step + 1, ctx.log))
        return record


# ---------------------------------------------------------------------------------------------------- helpers
def micro_batch_rows(rows_of: dict, groups: list[Optional[int]]) -> tuple[list[int], list[float], list[int]]:
    """Record rows of a micro-batch's groups, their weights, and each row's slot in the micro-batch (its
    shared-prompt segment); a filler group repeats group 0's rows with weight 0."""
    first = next(iter(rows_of))
    rows, weights, slots = [], [], []
    for slot, g in enumerate(groups):
        members = rows_of[g if g is not None else first]
        rows += members
        weights += [0.0 if g is None else 1.0] * len(members)
        slots += [slot] * len(members)
    return rows, weights, slots
