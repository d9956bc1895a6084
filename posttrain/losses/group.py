"""Inputs and shared helpers of the group (online RL) losses: GRPO, GTPO, COPO.

A group loss trains on G sampled completions per prompt. It works in two stages:

1. `plugin.compute_advantages(batch: RolloutBatch) -> Tensor` runs ONCE on the whole rollout batch
   (all prompts, all completions, gathered over processes) before it is split into micro-batches,
   because group baselines, batch-level std (`scale_rewards="batch"`) and COPO's cross-prompt
   advantage need every completion. It returns one row per completion: `[N]` (one advantage per
   completion), `[N, T]` (per token, GTPO) or `[N, K]` (a plug-in's own columns, COPO). The trainer
   treats the tensor as opaque per-completion data: it only slices rows (dim 0) into micro-batches.
2. `plugin(inputs: GroupLossInputs) -> LossOutput` runs per micro-batch and returns the paper loss per
   completion [N] (level "sequence") or per token [N, T] (level "token"); the core aggregates it with
   the step's global counts and derives the coefficients by autograd (posttrain.core.unified).

Estimator, policy loss and aggregation are three choices, as in verl: the advantage estimator is a
registered `AdvantageEstimator` (recipe key `rollout.advantage_estimator`, or the loss's default), the
policy loss is the plug-in, and `per_completion` is the one aggregation of per-token losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from posttrain.losses.base import LossPlugin
from posttrain.registry import Registry

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LOG_RATIO_CLAMP = 20.0  # |log pi_theta - log pi_old| is clamped here before exp (an overflow guard, not a trust region)


@dataclass
class RolloutBatch:
    """The whole rollout batch that `compute_advantages` sees (N completions in whole groups).

    `rewards [N]` scalar reward per completion; `group_index [N]` integer id of the prompt/group each
    completion belongs to (any ids; groups need not be contiguous or equally sized). Optional, per
    method: `mask [N, T]` completion-token mask and `token_ids [N, T]` (GTPO's conflict tokens;
    right-padded, completion starting at column 0), `entropy [N, T]` per-token entropy in nats of
    the policy that sampled (GTPO's entropy filter), `answers` extracted final-answer strings, one
    per completion (COPO's consistency entropy).
    """

    rewards: torch.Tensor
    group_index: torch.Tensor
    mask: Optional[torch.Tensor] = None
    token_ids: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    answers: Optional[list] = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.rewards.shape[0]
        if self.rewards.dim() != 1:
            raise ValueError(f"rewards must be [N], got shape {tuple(self.rewards.shape)}")
        if self.group_index.shape != (n,):
            raise ValueError(f"group_index must be [N] = [{n}], got shape {tuple(self.group_index.shape)}")
        for name in ("mask", "token_ids", "entropy"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 2 or value.shape[0] != n):
                raise ValueError(f"{name} must be [N, T] with N = {n}, got shape {tuple(value.shape)}")
        if self.answers is not None and len(self.answers) != n:
            raise ValueError(f"answers must hold one entry per completion ({n}), got {len(self.answers)}")


@dataclass
class GroupLossInputs:
    """Per-token inputs of a group loss for one micro-batch of N completions (whole groups).

    `logps [N, T]` log pi_theta of the completion tokens; `mask [N, T]` 1 on completion tokens (EOS
    included), 0 on padding; `old_logps` log pi_old of the sampling policy (None = on-policy: one
    update per rollout batch, i.e. `logps.detach()`, ratio exactly 1); `ref_logps` log pi_ref (None
    unless the loss needs a reference); `advantages` this micro-batch's rows of what
    `compute_advantages` returned on the whole rollout batch; `completion_weight [N]` 1 for real
    completions, 0 for rows that only fill a micro-batch. Optional: `entropy [N, T]`, `token_ids
    [N, T]`, `group_index [N]`, `rewards [N]`, `extras` (per-completion values from the prompt rows).
    """

    logps: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    completion_weight: torch.Tensor
    old_logps: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    token_ids: Optional[torch.Tensor] = None
    group_index: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)

    LOGPS: ClassVar[tuple[str, ...]] = ("logps",)  # what the core differentiates

    @property
    def example_weight(self) -> torch.Tensor:
        return self.completion_weight

    @property
    def token_mask(self) -> torch.Tensor:
        return self.mask

    def old(self) -> torch.Tensor:
        """log pi_old, detached (logps.detach() when on-policy)."""
        return self.logps.detach() if self.old_logps is None else self.old_logps.detach()

    def log_ratio(self) -> torch.Tensor:
        """log pi_theta - log pi_old per token, clamped to +-LOG_RATIO_CLAMP before any exp."""
        return (self.logps - self.old()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def per_completion(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
                   max_length: Optional[int] = None) -> tuple[torch.Tensor, str]:
    """The one aggregation of a per-token group loss (verl's loss_agg_mode): (values, level) for the core.

    token_mean: the per-token losses as they are (level token: averaged over the step's completion tokens);
    seq_mean_token_mean: each completion's token mean (level sequence);
    seq_mean_token_sum_norm: each completion's token sum / max_length (Dr. GRPO's constant; level sequence)."""
    mask = mask.to(per_token.dtype)
    if aggregation == "token_mean":
        return per_token * mask, "token"
    if aggregation == "seq_mean_token_mean":
        return (per_token * mask).sum(-1) / completion_lengths(mask), "sequence"
    if aggregation == "seq_mean_token_sum_norm":
        return (per_token * mask).sum(-1) / max_length, "sequence"
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


class GroupLoss(LossPlugin):
    """Base class of group (online RL) losses: `compute_advantages` on the whole rollout batch, then the
    per-micro-batch loss. No reference unless a subclass asks (a KL term). `accepts_estimator`: the
    recipe's `rollout.advantage_estimator` may replace `default_estimator`."""

    data_kind: ClassVar[str] = "groups"
    needs_reference: bool = False
    accepts_estimator: ClassVar[bool] = False
    default_estimator: ClassVar[Optional[str]] = None

    def use_estimator(self, name: Optional[str]) -> None:
        """Choose the advantage estimator by registered name (None: the loss's default)."""
        name = name or self.default_estimator
        self.estimator = ADVANTAGE_ESTIMATORS.get(name)() if name else None

    def compute_advantages(self, batch: "RolloutBatch") -> torch.Tensor:
        raise NotImplementedError  # abstractmethod: every group loss defines it

    def prepare_examples(self, examples: list, tokenizer, template: str) -> None:
        """Called once with the training prompts, before any model loads (HPT tokenises their gold solutions)."""

    def prepare_rollouts(self, records: list) -> tuple[list, dict]:
        """The step's scored rollouts as trained, and metrics to log (HPT replaces some groups by their gold
        demonstration). Default: unchanged."""
        return records, {}


SCALE_REWARDS_ESTIMATOR = {"group": "group_mean_std", "batch": "batch_std", "none": "group_mean"}


class ScaledRewardLoss(GroupLoss):
    """A group loss with GRPO's advantages (one per completion, from the estimator its `scale_rewards` param
    names, unless the recipe's `rollout.advantage_estimator` names another) and a reference only for its KL
    term (`beta > 0`): GRPO and GMPO."""

    accepts_estimator = True

    def __init__(self, params=None):
        super().__init__(params)
        self.needs_reference = self.params.beta > 0
        self.default_estimator = SCALE_REWARDS_ESTIMATOR[self.params.scale_rewards]
        self.use_estimator(None)

    def compute_advantages(self, batch: "RolloutBatch") -> torch.Tensor:
        """One advantage per completion [N] from the estimator (group baseline, TRL's std scaling by default)."""
        return self.estimator(batch)


# ----------------------------------------------------------------------------------------------------
# group statistics
# ----------------------------------------------------------------------------------------------------

def group_ids(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group ids 0..K-1 per completion [N] and the size of each group [K]."""
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    return inverse, counts


def group_mean(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Mean of `values [N]` within each group, broadcast back to [N]."""
    inverse, counts = group_ids(group_index)
    sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    return (sums / counts.to(values.dtype))[inverse]


def group_std(values: torch.Tensor, group_index: torch.Tensor, singleton: float = 0.0) -> torch.Tensor:
    """Bessel-corrected (ddof = 1) std of `values [N]` within each group, broadcast to [N]; a group of
    one completion gets `singleton` (TRL uses 0 there, verl's GRPO 1)."""
    inverse, counts = group_ids(group_index)
    dev = values - group_mean(values, group_index)
    sq = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add_(0, inverse, dev * dev)
    c = counts.to(values.dtype)
    var = torch.where(counts > 1, sq / (c - 1).clamp(min=1), torch.full_like(sq, singleton ** 2))
    return var.sqrt()[inverse]


def group_normalised_advantages(rewards: torch.Tensor, group_index: torch.Tensor, scale_rewards: str = "group",
                                eps: float = 1e-4) -> torch.Tensor:
    """TRL's GRPO advantages (spec section 6): A = r - mean_group(r), divided by (std + eps) unless
    `scale_rewards == "none"` (Dr. GRPO). `"group"`: Bessel-corrected std within the group (0 for a
    group of one, as TRL); `"batch"`: Bessel-corrected std over the whole rollout batch, the mean
    still per group. A group whose rewards are all equal gets A = 0 (0 / eps)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    rewards = rewards.detach()
    adv = rewards - group_mean(rewards, group_index)
    if scale_rewards == "group":
        adv = adv / (group_std(rewards, group_index) + eps)
    elif scale_rewards == "batch":
        std = rewards.std(correction=1) if rewards.numel() > 1 else rewards.new_zeros(())
        adv = adv / (std + eps)
    return adv


def group_sizes(group_index: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per completion [N]: the (weighted) number of completions in its group."""
    inverse, counts = group_ids(group_index)
    if weight is None:
        return counts[inverse].to(torch.float64)
    sums = torch.zeros(counts.shape[0], dtype=weight.dtype, device=weight.device).index_add_(0, inverse, weight)
    return sums[inverse]


# ----------------------------------------------------------------------------------------------------
# PPO clipping as the unified core's stabilisation mask
# ----------------------------------------------------------------------------------------------------

def ppo_clip(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
             dual_clip: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss `-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)` (TRL / verl) and its
    stabilisation mask 1_stable: 1 where the loss follows rho (its gradient is -A grad rho), 0 where
    it is constant (clipped: A > 0 and rho > 1+eps_high, or A < 0 and rho < 1-eps_low).

    `dual_clip = c` (verl, Ye et al. 2020): for A < 0 the loss is further capped at -c A, so tokens
    with A < 0 and rho > c are also constant. `ratio` and `advantages` broadcast.
    """
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    stable = ~(((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low)))
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
        stable = stable & ~((advantages < 0) & (ratio > dual_clip))
    return loss, stable.to(ratio.dtype)


def completion_lengths(mask: torch.Tensor) -> torch.Tensor:
    """|o_i| = completion tokens per row [N], at least 1 (an empty row divides by 1)."""
    return mask.sum(-1).clamp(min=1)


def as_token_tensor(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Advantages [N] or [N, T] as [N, 1] or [N, T] (detached)."""
    advantages = advantages.detach().to(like.dtype)
    if advantages.dim() == 1:
        return advantages[:, None]
    if advantages.shape != like.shape:
        raise ValueError(f"per-token advantages must be [N, T] = {tuple(like.shape)}, got {tuple(advantages.shape)}")
    return advantages


# ----------------------------------------------------------------------------------------------------
# advantage estimators (recipe: rollout.advantage_estimator)
# ----------------------------------------------------------------------------------------------------

class AdvantageEstimator:
    """One advantage per completion [N] from the whole rollout batch's rewards and groups."""

    name: ClassVar[str] = ""
    eps: ClassVar[float] = 1e-4  # TRL's std guard

    def __call__(self, batch: "RolloutBatch") -> torch.Tensor:
        raise NotImplementedError  # abstractmethod: every estimator defines it


ADVANTAGE_ESTIMATORS = Registry("advantage estimator", AdvantageEstimator)


@ADVANTAGE_ESTIMATORS.register("group_mean")
class GroupMean(AdvantageEstimator):
    """A = r - mean_group(r) (Dr. GRPO; GTPO)."""

    def __call__(self, batch):
        return group_normalised_advantages(batch.rewards, batch.group_index, "none", self.eps)


@ADVANTAGE_ESTIMATORS.register("group_mean_std")
class GroupMeanStd(AdvantageEstimator):
    """A = (r - mean_group(r)) / (std_group(r) + 1e-4), Bessel-corrected std (GRPO, TRL's default)."""

    def __call__(self, batch):
        return group_normalised_advantages(batch.rewards, batch.group_index, "group", self.eps)


@ADVANTAGE_ESTIMATORS.register("batch_std")
class BatchStd(AdvantageEstimator):
    """A = (r - mean_group(r)) / (std over the whole rollout batch + 1e-4) (TRL's scale_rewards="batch")."""

    def __call__(self, batch):
        return group_normalised_advantages(batch.rewards, batch.group_index, "batch", self.eps)


@ADVANTAGE_ESTIMATORS.register("leave_one_out")
class LeaveOneOut(AdvantageEstimator):
    """A_i = r_i - mean_{j != i in i's group} r_j (RLOO, Ahmadian et al. 2024); 0 for a group of one."""

    def __call__(self, batch):
        rewards = batch.rewards.detach()
        sizes = group_sizes(batch.group_index).to(rewards.dtype)
        sums = group_mean(rewards, batch.group_index) * sizes
        others = (sums - rewards) / (sizes - 1).clamp(min=1)
        return torch.where(sizes > 1, rewards - others, torch.zeros_like(rewards))


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
class ReinforcePlusPlus(AdvantageEstimator):
    """A = (r - mean(r)) / (std(r) + 1e-4), mean and Bessel-corrected std over the whole rollout batch
    (REINFORCE++, Hu et al. 2025, outcome rewards: the global batch normalisation, no per-prompt baseline)."""

    def __call__(self, batch):
        rewards = batch.rewards.detach()
        std = rewards.std(correction=1) if rewards.numel() > 1 else rewards.new_zeros(())
        return (rewards - rewards.mean()) / (std + self.eps)


@ADVANTAGE_ESTIMATORS.register("none")
class RawReward(AdvantageEstimator):
    """A = r (REINFORCE without a baseline)."""

    def __call__(self, batch):
        return batch.rewards.detach().clone()
