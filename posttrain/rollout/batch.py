"""A rollout batch as the step uses it: completion ids and mask, the engine's log-probs as tensors, each group's
reward spread and the rollout metrics logged per step (posttrain.steps.groups)."""

from __future__ import annotations

import torch

from posttrain.rollout.collect import RolloutRecord


def group_reward_std(records: list[RolloutRecord]) -> dict[int, float]:
    by_group: dict[int, list[float]] = {}
    for rec in records:
        by_group.setdefault(rec.group, []).append(rec.reward)
    return {g: float(torch.tensor(v, dtype=torch.float64, device="cpu").std(correction=0)) for g, v in by_group.items()}


def rollout_metrics(records: list[RolloutRecord], zero_groups: set[int], n_groups: int) -> dict:
    rewards = torch.tensor([rec.reward for rec in records], dtype=torch.float64, device="cpu")
    lengths = torch.tensor([len(rec.completion_ids) for rec in records], dtype=torch.float64, device="cpu")
    zero_share = len(zero_groups) / max(n_groups, 1)
    truncated_share = sum(rec.truncated for rec in records) / len(records)
    out = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std(correction=0).item(),
           "groups/zero_variance_share": zero_share,
           "pass@1": sum(rec.success for rec in records) / len(records),
           "completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
           "completions/min_length": lengths.min().item(), "completions/truncated_share": truncated_share,
           # TRL's GRPO names, for dashboards built on them (reward_std: the unbiased std over completions)
           "reward": rewards.mean().item(), "frac_reward_zero_std": zero_share,
           "reward_std": rewards.std(correction=1).item() if len(records) > 1 else 0.0,
           "completions/clipped_ratio": truncated_share}
    for name in sorted({name for rec in records for name in rec.components}):
        out[f"reward/{name}"] = sum(rec.components.get(name, 0.0) for rec in records) / len(records)
    return out


def completion_tensors(records: list[RolloutRecord], masked_truncated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion-aligned token ids and mask [N, T] on the host (right-padded, completion at column 0)."""
    width = max(1, max(len(rec.completion_ids) for rec in records))
    ids = torch.zeros((len(records), width), dtype=torch.long, device="cpu")
    mask = torch.zeros((len(records), width), dtype=torch.long, device="cpu")
    for i, rec in enumerate(records):
        ids[i, :len(rec.completion_ids)] = torch.tensor(rec.completion_ids, dtype=torch.long, device="cpu")
        if not (masked_truncated and rec.truncated):
            mask[i, :len(rec.completion_ids)] = 1
    return ids, mask


def engine_logprob_tensor(records: list[RolloutRecord], width: int) -> torch.Tensor:
    """The engine's log-probs of the completion tokens [N, T] (float64, host); NaN where the engine gave none
    (the hf engine: the trainer's own pi_old stands in) and on padding."""
    out = torch.full((len(records), width), float("nan"), dtype=torch.float64, device="cpu")
    for i, rec in enumerate(records):
        if rec.engine_logprobs is not None:
            out[i, :len(rec.engine_logprobs)] = torch.tensor(rec.engine_logprobs, dtype=torch.float64, device="cpu")
    return out
