"""Memory: the largest micro-batch a run will build, checked before training against
`train.max_tokens_per_micro_batch`, and what an out-of-memory error in a step reports.

A micro-batch costs memory by its padded size: 2 x pairs sequences (chosen and rejected), each
padded to the longest prompt + response among them (the plain row layout of posttrain.data.layout).
`train.share_prompt` and `train.packing` never build more positions than that, so for them the check
is an upper bound."""

from __future__ import annotations

from typing import Optional

import torch

from posttrain.errors import PosttrainError
from posttrain.plan import shard_for_rank


def micro_batch_tokens(pairs) -> tuple[int, int]:
    """(sequences, padded length) of the plain-layout micro-batch of these pairs."""
    length = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return 2 * len(pairs), length


def device_memory(device: torch.device) -> str:
    """A note on the accelerator's memory (free, total, peak allocated by this process), empty on CPU."""
    if device.type != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    gib = 2 ** 30
    return f" (GPU {device}: {free / gib:.1f} GiB free of {total / gib:.1f} GiB, peak allocated {peak / gib:.1f} GiB)"


def largest_micro_batch(pairs, plan, world: int, micro_batch_size: int, n_micro: int) -> tuple[int, int, int, int]:
    """(tokens, step, sequences, padded length) of the largest micro-batch any process will build
    over the whole plan (filler rows repeat pair 0 and count too: they take memory)."""
    best = (0, 0, 0, 0)
    for step in range(plan.total_steps):
        indices = plan.indices(step)
        for rank in range(world):
            for rows in shard_for_rank(indices, rank, world, micro_batch_size, n_micro):
                sequences, length = micro_batch_tokens([pairs[i if i is not None else 0] for i in rows])
                if sequences * length > best[0]:
                    best = (sequences * length, step, sequences, length)
    return best


def check_micro_batch_memory(recipe, pairs, plan, world: int, n_micro: int, device: torch.device) -> None:
    """Refuse, before training, a plan whose largest micro-batch exceeds
    `train.max_tokens_per_micro_batch`, saying which micro_batch_size or max_length would fit."""
    limit = recipe.train.max_tokens_per_micro_batch
    if limit is None or not pairs:
        return
    tokens, step, sequences, length = largest_micro_batch(pairs, plan, world, recipe.train.micro_batch_size, n_micro)
    if tokens <= limit:
        return
    t, d = recipe.train, recipe.data
    _, longest = micro_batch_tokens(pairs)  # any micro-batch is padded to at most this
    fitting_micro = limit // (2 * longest)
    fitting_length = limit // (2 * t.micro_batch_size)
    options = []
    if fitting_micro >= 1:
        options.append(f"train.micro_batch_size: {fitting_micro} (accumulation grows; the optimiser step keeps "
                       f"its {t.batch_size} pairs)")
    if fitting_length >= 2:
        options.append(f"data.max_length: {fitting_length} (now {d.max_length}; longer rows are then truncated, or "
                       f"refused under data.truncation: error)")
    options.append(f"train.max_tokens_per_micro_batch: {tokens} if this machine has the memory")
    raise PosttrainError(f"the largest micro-batch of this run (step {step + 1}: {sequences} sequences padded to "
                         f"{length} tokens = {tokens} tokens) exceeds train.max_tokens_per_micro_batch={limit}. "
                         f"Set {'; or '.join(options)}.{device_memory(device)}")


def out_of_memory_message(step: int, pairs, rows: list[Optional[int]], device: torch.device) -> str:
    sequences, length = micro_batch_tokens(pairs)
    where = ", ".join(f"{p.source} row {p.row}" for p, i in zip(pairs, rows) if i is not None)
    return (f"step {step + 1}: out of memory in a micro-batch of {len(pairs)} pairs ({sequences} sequences padded "
            f"to {length} tokens = {sequences * length} tokens; {where or 'filler rows only'}). Lower "
            f"train.micro_batch_size (the optimiser step keeps its size; accumulation grows) or data.max_length, "
            f"and set train.max_tokens_per_micro_batch below {sequences * length} to have every micro-batch "
            f"checked against it before training.{device_memory(device)}")

