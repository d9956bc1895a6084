"""GTPO, Group-relative Trajectory-based Policy Optimization (Simoni et al. 2025, arXiv 2508.03772); spec section 7.

Code semantics (winstonsmith1897/GTPO gtpo_training.py), authoritative for reproduction:

    A_i    = r_i - mean_group(r)                                  no std normalisation
    H_i    = mean entropy (nats) over completion i's tokens
    A'_i   = A_i - ent_scale * H_i  if H_i <= ent_threshold  else 0   (all completions, also A_i = 0)
    conflict tokens: token id at position t shared by >= 1 positive (A_i > 0) and >= 1 negative
      completion of the group; only the contiguous shared prefix (fwd run) and the contiguous shared
      suffix on end-aligned sequences (bwd run) count.
    lambda_{i,t} = delta_fwd * delta_bwd,  delta = 1 off the run, w_raw on it for a positive
      completion, 0 on it for a negative one;  n_conf_i = max(1, #tokens in fwd run OR bwd run)
    loss_i = -(sum_t m_t A'_i lambda_{i,t} rho_t) / |o_i| / n_conf_i      (rho = 1 on-policy)

`compute_advantages` returns the per-token weights A'_i lambda_{i,t} / n_conf_i [N, T] (without
`/n_conf` when `divide_by_n_conflict: false`). No reference model, no KL, no clipping (the code
is on-policy: rho = exp(lp - lp.detach())); off-policy rows get the plain ratio to pi_old.

`reduction`:
- `sum` (default; the authors' code): the per-completion losses are summed over the group. Their
  config trains one prompt per step; with several groups in a step posttrain averages the group
  sums over the groups, i.e. sum_i G_i loss_i / (completions in the step), G_i = the size of i's group.
- `mean` (the paper's README formula, 1/G): the mean of the per-completion losses over the step.
The README formula also has no `/n_conf`: `reduction: mean, divide_by_n_conflict: false`.
The README's delta_i gate on the initial entropy <H>_ini is not in the code and not implemented.

Sequence level (loss_i, times G_i for `sum`); the core's coefficients are
c_t = rho_t A'_i lambda_{i,t} / n_conf_i / |o_i| times the reduction's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.losses.base import LossOutput, register_loss
from posttrain.losses.group import (GroupLoss, GroupLossInputs, RolloutBatch, completion_lengths, group_ids,
                                    group_mean, group_sizes)


def _shared_runs(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Within one group: [G, L] bool, the contiguous run from column 0 of tokens whose (column, id)
    occurs in at least one positive and at least one negative completion (masked tokens only)."""
    valid = mask.bool()
    # same[i, j, t]: completion j has the same (real) token as completion i at column t
    same = (ids[:, None, :] == ids[None, :, :]) & valid[:, None, :] & valid[None, :, :]
    present_pos = (same & pos[None, :, None]).any(1)
    present_neg = (same & neg[None, :, None]).any(1)
    raw = present_pos & present_neg & valid
    return torch.cumprod(raw.to(torch.int64), dim=1).bool()


def _end_aligned(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row i reversed within its first lengths[i] columns (right padding stays at the end)."""
    length = x.shape[1]
    cols = torch.arange(length, device=x.device)[None, :]
    src = (lengths[:, None] - 1 - cols).clamp(min=0)
    src = torch.where(cols < lengths[:, None], src, cols)
    return x.gather(1, src)


def conflict_weights(token_ids: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                     group_index: torch.Tensor, w_raw: float = 2.0):
    """GTPO's conflict weights lambda [N, T] and n_conf [N] (spec section 7), per group.

    Positive / negative completions are judged on the unshaped A (A > 0 / A < 0); completions with
    A = 0 keep lambda = 1 and n_conf = 1. Sequences are right-padded (completion from column 0).
    Returns (lambda, n_conf, fwd_run, bwd_run)."""
    n, length = token_ids.shape
    mask = mask.bool()
    lam = mask.to(torch.float64).clone()
    fwd = torch.zeros(n, length, dtype=torch.bool, device=token_ids.device)
    bwd = torch.zeros_like(fwd)
    inverse, counts = group_ids(group_index)
    lengths = mask.sum(-1)
    for g in range(counts.shape[0]):
        rows = (inverse == g).nonzero(as_tuple=True)[0]
        a = advantages[rows]
        pos, neg = a > 0, a < 0
        if not (pos.any() and neg.any()):
            continue
        ids, m = token_ids[rows], mask[rows]
        run_f = _shared_runs(ids, m, pos, neg)
        rev_ids, rev_m = _end_aligned(ids, lengths[rows]), _end_aligned(m, lengths[rows])
        run_b = _end_aligned(_shared_runs(rev_ids, rev_m, pos, neg), lengths[rows])
        active = (pos | neg)[:, None]  # completions with A = 0 take no part (lambda 1, n_conf 1)
        run_f, run_b = run_f & active, run_b & active
        fwd[rows], bwd[rows] = run_f, run_b
        on_run = torch.where(pos[:, None], torch.full_like(lam[rows], w_raw), torch.zeros_like(lam[rows]))
        d_f = torch.where(run_f, on_run, torch.ones_like(on_run))
        d_b = torch.where(run_b, on_run, torch.ones_like(on_run))
        lam[rows] = d_f * d_b * m
    n_conf = ((fwd | bwd) & mask).sum(-1).clamp(min=1)
    return lam, n_conf, fwd, bwd


@register_loss("gtpo")
class GTPOLoss(GroupLoss):
    level = "sequence"
    needs_sampling_entropy = True

    @dataclass
    class Params:
        ent_threshold: float = 0.7  # ~ ln 2
        ent_scale: float = 0.1  # gamma
        w_raw: float = 2.0
        reduction: Literal["sum", "mean"] = "sum"  # sum = the authors' code
        divide_by_n_conflict: bool = True  # the code divides by n_conf; the README formula does not

        def validate(self):
            if self.ent_scale < 0:
                raise ValueError(f"ent_scale must be >= 0, got {self.ent_scale}")
            if self.w_raw < 0:
                raise ValueError(f"w_raw must be >= 0, got {self.w_raw}")

    def shaped_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """A'_i [N]: r - group mean, then the entropy filter/shaping."""
        if batch.entropy is None or batch.mask is None:
            raise ValueError("GTPO's entropy filter needs the rollout batch's per-token entropy and mask "
                             "(RolloutBatch.entropy, RolloutBatch.mask).")
        p = self.params
        rewards = batch.rewards.detach().to(torch.float64)
        adv = rewards - group_mean(rewards, batch.group_index)
        mask = batch.mask.to(torch.float64)
        mean_entropy = (batch.entropy.detach().to(torch.float64) * mask).sum(-1) / completion_lengths(mask)
        return torch.where(mean_entropy <= p.ent_threshold, adv - p.ent_scale * mean_entropy, torch.zeros_like(adv))

    def compute_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """Per-token weights A'_i lambda_{i,t} / n_conf_i [N, T] (float64)."""
        if batch.token_ids is None:
            raise ValueError("GTPO's conflict tokens need RolloutBatch.token_ids.")
        p = self.params
        shaped = self.shaped_advantages(batch)
        rewards = batch.rewards.detach().to(torch.float64)
        adv = rewards - group_mean(rewards, batch.group_index)  # conflicts are judged on A before shaping
        lam, n_conf, _, _ = conflict_weights(batch.token_ids, batch.mask, adv, batch.group_index, p.w_raw)
        out = shaped[:, None] * lam
        if p.divide_by_n_conflict:
            out = out / n_conf[:, None].to(out.dtype)
        return out

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        adv = inputs.advantages.detach().to(lp.dtype)
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(lp)
        ratio = torch.exp(inputs.log_ratio())
        per_completion = -(mask * adv * ratio).sum(-1) / completion_lengths(mask)  # the code's loss_i
        metrics = {"gtpo/completion_loss": per_completion.detach()}
        if self.params.reduction == "mean":
            return LossOutput(per_completion, metrics)
        if inputs.group_index is None:
            raise ValueError("GTPO reduction 'sum' sums each group's completions: GroupLossInputs.group_index is needed.")
        group_size = group_sizes(inputs.group_index, inputs.completion_weight.to(lp.dtype)).to(lp.dtype)
        return LossOutput(group_size * per_completion, metrics)
