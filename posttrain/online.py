"""The online half of the one trainer: sample prompts, roll out groups, score them, update with a group loss.

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
   global normalisers (completions and completion tokens of the whole step), `rollout.updates_per_batch`
   optimiser updates per rollout batch. pi_old comes from a no-grad pass over the rollout tokens (logits /
   temperature, dropout off) when there is more than one update or the recipe asks for it; with one update
   it is the current policy detached, so the ratio is exactly 1.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from posttrain.core import Normaliser
from posttrain.errors import RecipeError
from posttrain.losses.group import GroupLossInputs, RolloutBatch
from posttrain.rollout import HFGenerateEngine, RolloutCollector, RolloutRecord, RolloutStats, SamplingParams


# ---------------------------------------------------------------------------------------------------- set-up
def sampling_params(recipe, greedy: bool = False) -> SamplingParams:
    ro = recipe.rollout
    max_new = (ro.eval_max_new_tokens or ro.max_new_tokens) if greedy else ro.max_new_tokens
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=0 if greedy else ro.min_new_tokens,
                          temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, greedy=greedy)


def build_engine(trainer):
    """The recipe's generation engine: `hf`, or a user's `module.path:Class` taking the trainer."""
    ro = trainer.recipe.rollout
    if ro.engine == "hf":
        return HFGenerateEngine(lambda: trainer.peft_model, trainer.pad_id, stop_token_ids(trainer.tokenizer),
                                ro.generation_batch_size, gather=trainer.gathered_for_generation,
                                autocast=trainer._autocast, prefill_once=ro.prefill_once)
    from posttrain.imports import import_object
    from posttrain.rollout import GenerationEngine

    cls = import_object(ro.engine, [trainer.recipe_dir] if trainer.recipe_dir else [], f"rollout.engine {ro.engine!r}",
                        GenerationEngine)
    return cls(trainer)


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-turn token the tokenisation contract appends (the tokenizer's EOS)."""
    if tokenizer.eos_token_id is None:
        raise RecipeError("the tokenizer has no EOS token, so a generated completion could never end; set one.")
    return [tokenizer.eos_token_id]


def tokenize_prompts(examples: list, tokenizer, template: str, max_prompt_length: Optional[int]) -> list[list[int]]:
    """Rendered prompt ids (the tokenisation contract's prompt side; the prompt keeps its last tokens)."""
    from posttrain.data.tokenize import render_prompt

    add_special = template == "plain"
    out = []
    for example in examples:
        ids = tokenizer(render_prompt(tokenizer, example.prompt, template), add_special_tokens=add_special)["input_ids"]
        out.append(ids[-max_prompt_length:] if max_prompt_length else ids)
    return out


def load_examples(trainer, source, what: str) -> list:
    from posttrain.data.prompts import load_prompt_examples

    r = trainer.recipe
    skipped = trainer.output_dir / "skipped_rows.jsonl" if trainer.accelerator.is_main_process else None
    path = source.path if source.path else f"builtin:{source.builtin}"
    examples, _ = load_prompt_examples(path, source.format, source.split, source.start, source.limit,
                                       r.data.invalid_rows, skipped, what)
    if source.builtin and source.num_rows is not None:
        examples = examples[:source.num_rows]
    if not examples:
        from posttrain.errors import DataError

        raise DataError(f"{what}: no usable prompts in {path}. Check the file and its fields.")
    return examples


def setup_online(trainer) -> None:
    """Prompts, rewards, sampler and collector of an online run (called by Trainer.setup)."""
    from posttrain.rewards import build_reward_set
    from posttrain.samplers import build_sampler

    r = trainer.recipe
    if not r.rewards:
        raise RecipeError(f"loss {r.loss[0].name!r} trains on sampled groups and needs at least one reward: add a "
                          f"`rewards:` section (for example `rewards: [{{name: math}}]`; see docs/rewards.md).")
    trainer.train_examples = load_examples(trainer, r.data.train, "data.train")
    trainer.heldout_examples = load_examples(trainer, r.data.heldout, "data.heldout") if r.data.heldout else []
    if r.eval.max_pairs is not None:
        trainer.heldout_examples = trainer.heldout_examples[:r.eval.max_pairs]
    if r.train.batch_size > len(trainer.train_examples):
        raise RecipeError(f"train.batch_size={r.train.batch_size} prompts per step, but data.train has only "
                          f"{len(trainer.train_examples)} prompts.")
    template, mpl = r.data.template, r.data.max_prompt_length
    trainer.train_prompt_ids = tokenize_prompts(trainer.train_examples, trainer.tokenizer, template, mpl)
    trainer.heldout_prompt_ids = tokenize_prompts(trainer.heldout_examples, trainer.tokenizer, template, mpl)
    search = [trainer.recipe_dir] if trainer.recipe_dir else []
    trainer.rewards = build_reward_set(r.rewards, num_workers=r.rollout.reward_workers,
                                       timeout_s=r.rollout.reward_timeout, search_dirs=search)
    component = r.sampler.success_component or r.rewards[0].name
    if component not in trainer.rewards.names:
        raise RecipeError(f"sampler.success_component {component!r} is not a reward component; the rewards give "
                          f"{', '.join(trainer.rewards.names)}.")
    trainer.success_component = component
    trainer.sampler = build_sampler(r.sampler.name, len(trainer.train_examples), seed=r.run.seed, **r.sampler.params)
    trainer.engine = build_engine(trainer)

    def collector(examples, prompt_ids, truncated, truncated_reward):
        return RolloutCollector(trainer.engine, trainer.rewards, examples, prompt_ids,
                                lambda ids: trainer.tokenizer.decode(ids, skip_special_tokens=True), component,
                                r.sampler.success_threshold, truncated, truncated_reward, trainer.world, trainer.rank,
                                _gather_object)

    trainer.collector = collector(trainer.train_examples, trainer.train_prompt_ids, r.rollout.truncated,
                                  r.rollout.truncated_reward)
    trainer.heldout_collector = collector(trainer.heldout_examples, trainer.heldout_prompt_ids, "keep", 0.0)


def _gather_object(records: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(records)


def _broadcast(value):
    from accelerate.utils import broadcast_object_list

    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


# ---------------------------------------------------------------------------------------------------- rollouts
def select_prompts(trainer, count: int, exclude: set[int]) -> list[int]:
    """`count` dataset indices from the sampler, chosen on process 0 and broadcast; indices already in the
    step are left out (the batch may then be smaller)."""
    chosen = None
    if trainer.rank == 0:
        chosen = [i for i in trainer.sampler.select(min(count, trainer.sampler.num_items)) if i not in exclude]
    return _broadcast(chosen) if trainer.world > 1 else chosen


def group_reward_std(records: list[RolloutRecord]) -> dict[int, float]:
    by_group: dict[int, list[float]] = {}
    for rec in records:
        by_group.setdefault(rec.group, []).append(rec.reward)
    return {g: float(torch.tensor(v, dtype=torch.float64).std(correction=0)) for g, v in by_group.items()}


def collect_step(trainer, step_metrics: dict) -> list[RolloutRecord]:
    """The step's rollout batch, after the zero-variance filter and its resampling rounds; the sampler is updated
    with every group that was rolled out."""
    r = trainer.recipe
    ro, batch_size, group_size = r.rollout, r.train.batch_size, r.rollout.group_size
    params = sampling_params(r)
    stats = RolloutStats()
    trainer.engine.sync_weights(trainer.peft_model)
    kept: list[RolloutRecord] = []
    used: set[int] = set()
    next_group, rounds, zero_var_groups, rolled_groups = 0, 0, 0, 0
    while True:
        indices = select_prompts(trainer, batch_size - len({rec.group for rec in kept}), used)
        used.update(indices)
        records = trainer.collector.collect(indices, group_size, params, next_group, stats)
        next_group += len(indices)
        _update_sampler(trainer, records, group_size)
        stds = group_reward_std(records)
        zero = {g for g, s in stds.items() if s <= ro.zero_variance_eps}
        zero_var_groups += len(zero)
        rolled_groups += len(stds)
        if rounds == 0:
            step_metrics.update(_rollout_metrics(records, zero, len(stds)))
        kept += [rec for rec in records if not (ro.filter_zero_variance and rec.group in zero)]
        groups_kept = len({rec.group for rec in kept})
        if not ro.filter_zero_variance or groups_kept >= batch_size or rounds >= ro.max_resample_rounds:
            break
        rounds += 1
    if ro.filter_zero_variance:
        step_metrics.update({"filter/resample_rounds": float(rounds), "filter/groups": float(groups_kept),
                             "filter/dropped_groups": float(zero_var_groups),
                             "filter/rolled_out_groups": float(rolled_groups)})
        if groups_kept < batch_size:
            trainer.log.info("step %d: %d of %d groups have reward variance after %d resampling rounds; training on "
                             "them", trainer.current_step + 1, groups_kept, batch_size, rounds)
    step_metrics.update({"time/generation": stats.generation_seconds, "time/rewards": stats.reward_seconds,
                         "time/gather": stats.gather_seconds})
    return kept


def _update_sampler(trainer, records: list[RolloutRecord], group_size: int) -> None:
    """Every process updates its sampler with the same gathered records, so their states stay equal."""
    successes: dict[int, float] = {}
    for rec in records:
        successes[rec.index] = successes.get(rec.index, 0.0) + float(rec.success)
    if successes:
        trainer.sampler.update(list(successes), list(successes.values()), group_size)


def _rollout_metrics(records: list[RolloutRecord], zero_groups: set[int], n_groups: int) -> dict:
    rewards = torch.tensor([rec.reward for rec in records], dtype=torch.float64)
    lengths = torch.tensor([len(rec.completion_ids) for rec in records], dtype=torch.float64)
    out = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std(correction=0).item(),
           "groups/zero_variance_share": len(zero_groups) / max(n_groups, 1),
           "pass@1": sum(rec.success for rec in records) / len(records),
           "completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
           "completions/truncated_share": sum(rec.truncated for rec in records) / len(records)}
    names = sorted({name for rec in records for name in rec.components})
    for name in names:
        out[f"reward/{name}"] = sum(rec.components.get(name, 0.0) for rec in records) / len(records)
    return out


# ---------------------------------------------------------------------------------------------------- batches
def completion_tensors(records: list[RolloutRecord], masked_truncated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion-aligned token ids and mask [N, T] (right-padded, completion at column 0)."""
    width = max(1, max(len(rec.completion_ids) for rec in records))
    ids = torch.zeros((len(records), width), dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    for i, rec in enumerate(records):
        ids[i, :len(rec.completion_ids)] = torch.tensor(rec.completion_ids, dtype=torch.long)
        if not (masked_truncated and rec.truncated):
            mask[i, :len(rec.completion_ids)] = 1
    return ids, mask


def split_groups(groups: list[int], world: int, rank: int, per_micro: int, n_micro: int) -> list[list[Optional[int]]]:
    """This process's micro-batches of groups: groups k, k+world, ... for rank k, then `None` fillers so every
    process runs exactly `n_micro` micro-batches of `per_micro` groups (collectives stay in step)."""
    mine: list[Optional[int]] = list(groups[rank::world])
    mine += [None] * (n_micro * per_micro - len(mine))
    return [mine[i:i + per_micro] for i in range(0, len(mine), per_micro)]


# ---------------------------------------------------------------------------------------------------- one step
def online_step(trainer, step: int) -> dict:
    """One rollout batch and its `rollout.updates_per_batch` optimiser updates; returns the step's metrics."""
    r = trainer.recipe
    ro = r.rollout
    record: dict = {}
    t0 = time.time()
    records = collect_step(trainer, record)
    record["time/rollout"] = time.time() - t0
    if not records:
        trainer.log.warning("step %d: every group had zero reward variance after %d resampling rounds; no update",
                            step + 1, ro.max_resample_rounds)
        return {**record, "loss": 0.0, "skipped": 1.0, "num_tokens": 0.0}
    masked = ro.truncated == "mask"
    token_ids, mask = completion_tensors(records, masked)
    if mask.sum() == 0:
        trainer.log.warning("step %d: every completion was truncated and rollout.truncated is 'mask', so no token "
                            "is left to train on; no update. Raise rollout.max_new_tokens.", step + 1)
        return {**record, "loss": 0.0, "skipped": 1.0, "num_tokens": 0.0}
    group_of = torch.tensor([rec.group for rec in records])
    groups = sorted(set(group_of.tolist()))
    rows_of = {g: [i for i, rec in enumerate(records) if rec.group == g] for g in groups}
    # Always the configured number of micro-batches (fillers when the filter left fewer groups): accelerate and
    # DeepSpeed count micro-batches to find the accumulation boundary.
    micro = split_groups(groups, trainer.world, trainer.rank, r.train.micro_batch_size, trainer.n_micro)

    t1 = time.time()
    entropy = None
    old_logps: dict[int, torch.Tensor] = {}
    if ro.updates_per_batch > 1 or ro.recompute_old_logprobs or trainer.loss.needs_sampling_entropy:
        old_logps, entropy = sampling_pass(trainer, records, rows_of, micro, mask.shape[1])
    record["time/old_logprobs"] = time.time() - t1
    batch = RolloutBatch(rewards=torch.tensor([rec.reward for rec in records], dtype=torch.float64),
                         group_index=group_of, mask=mask, token_ids=token_ids, entropy=entropy,
                         answers=[rec.answer for rec in records])
    try:
        advantages = trainer.loss.compute_advantages(batch)
    except ValueError as exc:  # a plug-in's word on a batch the recipe shaped (e.g. COPO with one prompt)
        raise RecipeError(f"loss {r.loss[0].name!r} cannot use the rollout batch of step {step + 1} "
                          f"({len(groups)} prompts x {ro.group_size} completions): {exc} Adjust train.batch_size "
                          f"or the rollout settings.") from None
    normaliser = Normaliser(sequences=float(len(records)), tokens=float(mask.sum().item()))

    t2 = time.time()
    for update in range(ro.updates_per_batch):
        out = update_on_groups(trainer, records, rows_of, micro, batch, advantages, old_logps, normaliser)
        if update == 0:
            record.update(out)
        else:
            record.update({f"update{update + 1}/{k}": v for k, v in out.items() if k in ("loss", "grad_norm")})
    record["time/train"] = time.time() - t2
    record["num_tokens"] = float(sum(len(rec.prompt_ids) + len(rec.completion_ids) for rec in records))
    return record


def _rows(rows_of: dict, groups: list[Optional[int]]) -> tuple[list[int], list[float], list[int]]:
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


def group_rows(trainer, records: list[RolloutRecord], rows: list[int], slots: list[int]):
    """The micro-batch's prompt + completion sequences in the recipe's row layout (posttrain.data.layout): with
    `train.share_prompt` a group's prompt is computed once for its G completions."""
    from posttrain.data.layout import build_sequence_rows
    from posttrain.eval.ranking import attention_kind, model_dtype

    t = trainer.recipe.train
    return build_sequence_rows([(records[i].prompt_ids, records[i].completion_ids) for i in rows], trainer.pad_id,
                               shared_by=slots if t.share_prompt else None,
                               pack_tokens=t.pack_tokens if t.packing else None,
                               attention=attention_kind(trainer.model), mask_dtype=model_dtype(trainer.model))


def _forward(trainer, records, rows, slots, width, temperature, reference=False):
    """Completion log-probs [len(rows), width] (and per-token entropy, None for the reference)."""
    layout = group_rows(trainer, records, rows, slots)
    with trainer._autocast():
        if reference:
            dense, ent = trainer._reference_logps(layout.as_batch(), temperature), None
        else:
            dense, ent = trainer.model(*layout.model_inputs(), temperature=temperature, return_entropy=True)

    def completion(values):
        out = layout.gather(values)
        return torch.nn.functional.pad(out, (0, width - out.shape[1]))

    return completion(dense), completion(ent) if ent is not None else None


@torch.no_grad()
def sampling_pass(trainer, records, rows_of, micro, width) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """pi_old log-probs of this process's rows (in the training micro-batch layout, so with one update the ratio
    is exactly 1) and the sampling policy's per-token entropy of every completion (gathered)."""
    was_training = trainer.model.training
    trainer.model.eval()
    old: dict[int, torch.Tensor] = {}
    mine_entropy: dict[int, list[float]] = {}
    try:
        for groups in micro:
            rows, weights, slots = _rows(rows_of, groups)
            logps, entropy = _forward(trainer, records, rows, slots, width, trainer.recipe.rollout.temperature)
            for k, (i, w) in enumerate(zip(rows, weights)):
                if w > 0:
                    old[i] = logps[k].detach().clone()
                    mine_entropy[i] = entropy[k].float().tolist()
    finally:
        trainer.model.train(was_training)
    gathered = _gather_object([mine_entropy]) if trainer.world > 1 else [mine_entropy]
    full = torch.zeros((len(records), width), dtype=torch.float64)
    for part in gathered:
        for i, values in part.items():
            full[i] = torch.tensor(values, dtype=torch.float64)
    return old, full


def update_on_groups(trainer, records, rows_of, micro, batch: RolloutBatch, advantages, old_logps,
                     normaliser: Normaliser) -> dict:
    """Forward/backward over this process's micro-batches of whole groups, then one optimiser update."""
    acc, r = trainer.accelerator, trainer.recipe
    scale = trainer.world * len(micro)
    width = batch.mask.shape[1]
    temperature = r.rollout.temperature
    loss_sum, weight_sum = 0.0, 0.0
    metric_sums: dict[str, float] = {}
    part_sums: dict[str, float] = {}
    entropy_sum, entropy_tokens = 0.0, 0.0
    for groups in micro:
        rows, weights, slots = _rows(rows_of, groups)
        index = torch.tensor(rows)
        weight = torch.tensor(weights, dtype=torch.float64)
        with acc.accumulate(trainer.model):
            logps, entropy = _forward(trainer, records, rows, slots, width, temperature)
            dtype = logps.dtype
            mask = batch.mask[index].to(dtype)
            ref = None
            if trainer.loss.needs_reference:
                ref, _ = _forward(trainer, records, rows, slots, width, temperature, reference=True)
                ref = ref.to(dtype)
            old = None
            if old_logps:
                old = torch.stack([old_logps[i] if w > 0 else logps[k].detach() for k, (i, w) in
                                   enumerate(zip(rows, weights))]).to(dtype)
            inputs = GroupLossInputs(
                logps=logps, mask=mask, advantages=advantages[index], normaliser=normaliser, completion_weight=weight.to(dtype),
                old_logps=old, ref_logps=ref,
                entropy=batch.entropy[index].to(dtype) if batch.entropy is not None else None,
                token_ids=batch.token_ids[index], group_index=batch.group_index[index],
                rewards=batch.rewards[index].to(dtype))
            out = trainer.loss(inputs)
            acc.backward(out.loss * scale)
        loss_sum += out.loss.item()
        weight_sum += weight.sum().item()
        real = mask * weight.to(dtype)[:, None]
        entropy_sum += (entropy.double() * real.double()).sum().item()
        entropy_tokens += real.sum().item()
        for name, value in out.metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + (value.double().reshape(-1) * weight).sum().item()
        for name, value in out.parts.items():
            part_sums[name] = part_sums.get(name, 0.0) + value.item()
    names, parts = sorted(metric_sums), sorted(part_sums)
    local = torch.tensor([loss_sum, weight_sum, entropy_sum, entropy_tokens] + [metric_sums[n] for n in names]
                         + [part_sums[n] for n in parts], dtype=torch.float64)
    total = acc.reduce(local.to(acc.device), reduction="sum").cpu() if trainer.world > 1 else local
    out = {"loss": total[0].item(), "entropy": total[2].item() / max(total[3].item(), 1e-12)}
    for k, name in enumerate(names):
        out[name] = total[4 + k].item() / max(total[1].item(), 1e-12)
    for k, name in enumerate(parts):
        out[name] = total[4 + len(names) + k].item()
    out.update(trainer._finish_update(out["loss"], _where(records)))
    return out


def _where(records: list[RolloutRecord]) -> str:
    indices = sorted({rec.index for rec in records})
    return f"groups of prompts {indices[:6]}{' ...' if len(indices) > 6 else ''}"


# ---------------------------------------------------------------------------------------------------- evaluation
def greedy_evaluation(trainer) -> Optional[dict]:
    """Greedy pass@1 (and mean reward) on the held-out prompts, each process generating an equal share."""
    if not trainer.heldout_examples:
        return None
    r = trainer.recipe
    t0 = time.time()
    indices = list(range(len(trainer.heldout_examples)))
    records = trainer.heldout_collector.collect(indices, 1, sampling_params(r, greedy=True))
    n = len(records)
    successes = sum(rec.success for rec in records)
    p = successes / n
    result = {"pass@1": p, "pass@1_stderr": math.sqrt(max(p * (1 - p), 0.0) / n), "reward_mean":
              sum(rec.reward for rec in records) / n, "num_prompts": float(n),
              "mean_length": sum(len(rec.completion_ids) for rec in records) / n,
              "truncated_share": sum(rec.truncated for rec in records) / n, "seconds": time.time() - t0}
    if trainer.accelerator.is_main_process and r.eval.report:
        import json

        directory = trainer.output_dir / "eval"
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"greedy-step-{trainer.current_step:08d}.jsonl").open("w", encoding="utf-8") as handle:
            for rec in records:
                example = trainer.heldout_examples[rec.index]
                handle.write(json.dumps({"source": example.source, "row": example.row, "answer": example.answer,
                                         "completion": rec.text, "extracted": rec.answer, "reward": rec.reward,
                                         "success": rec.success, "truncated": rec.truncated}) + "\n")
    return result
