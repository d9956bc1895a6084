"""COPO, Consistency-Aware Policy Optimization (Han, Chen, Shao, et al. 2025, arXiv 2508.04138); spec section 8.

From the authors' verl code (hijih/copo-code core_algos.py), per prompt q with n rollouts, reward
r_i in {0, 1} and extracted final answers a_i:

    A_loc_i  = (r_i - mean(r)) / (std(r) + 1e-6)       std ddof 1; a group of one: mean 0, std 1 (verl)
    H(q)     = -sum_a p_a log2 p_a                      entropy in BITS of the answer strings (exact match)
    R_glob   = mean(r) * c,   c = 1 - lambda_n H(q) if reward_coef_flg else 1,  lambda_n = (1 - 1/n) / log2 n
    A_glob   = (R_glob(q) - mean_q' R_glob) / (std_q' R_glob + 1e-6)   across the PROMPTS of the batch, ddof 1
    w(q)     = sigmoid(k (H(q) - b))                    weight of the local (GRPO) loss

Token loss, both advantages with the same ratio rho = pi_theta / pi_old, dual-clip PPO (c = 3):

    l(A) = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), and for A < 0: min(that, -c A)
    loss = (1 - w_i) * l(A_glob) + w_i * l(A_loc_i)

with w_i by `global_flg`: soft-with-zero (shipped default) w(q) 1[r_i != 0]; only-soft w(q);
soft-with-forced w(q) 1[A_loc_i != 0]; only-zero 1[r_i != 0]; only-forced 1[A_loc_i != 0];
only-global 0; no-global 1; only-soft-with-coef w(q), and the global term times global_loss_coef.
Aggregation seq-mean-token-mean: each completion's token mean, averaged over the step's completions
(a global denominator; verl averages per mini-batch).

`compute_advantages` returns [N, 3] columns (A_loc, A_glob, w_i); the trainer only slices rows.
It needs at least two prompts in the rollout batch (A_glob's std over prompts); with one it raises.
Defaults are the shipped run script's (run_copo.sh): k = 5, b = 1, soft-with-zero, reward_coef_flg
false, clip 0.2 / 0.2, no KL. (The function defaults in core_algos.py are k = 1, b = 0.5.)

Sequence level (each completion's token mean); the core's coefficients follow each advantage's
dual-clip branch, scaled by its blend weight and 1/|o_i|.

Differences from the code: entropy is computed exactly (the code adds 1e-8 inside log2, in float32);
`not_zero` is always taken from the rewards (in verl it is only filled when
norm_adv_by_std_in_grpo = True, otherwise soft-with-zero silently becomes pure global).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.losses.base import LossOutput, register_loss
from posttrain.losses.group import (GroupLoss, GroupLossInputs, RolloutBatch, completion_lengths, group_ids,
                                    per_completion, ppo_clip)

GLOBAL_FLAGS = ("soft-with-zero", "only-soft", "soft-with-forced", "only-zero", "only-forced", "only-global",
                "no-global", "only-soft-with-coef")


def answer_entropy_bits(answers) -> float:
    """Entropy in bits of the empirical distribution of answer strings (exact-match counting)."""
    counts = Counter(answers)
    total = sum(counts.values())
    return -sum((c / total) * math.log2(c / total) for c in counts.values()) + 0.0


@register_loss("copo")
class COPOLoss(GroupLoss):
    level = "sequence"
    advantage_columns = ("local", "global", "local_weight")

    @dataclass
    class Params:
        k: float = 5.0
        b: float = 1.0
        global_flg: Literal["soft-with-zero", "only-soft", "soft-with-forced", "only-zero", "only-forced",
                            "only-global", "no-global", "only-soft-with-coef"] = "soft-with-zero"
        reward_coef_flg: bool = False
        global_loss_coef: float = 1.0  # only-soft-with-coef only
        epsilon: float = 0.2
        epsilon_high: float = 0.2
        clip_ratio_c: float = 3.0  # dual clip

        def validate(self):
            if self.global_flg not in GLOBAL_FLAGS:
                raise ValueError(f"global_flg must be one of {GLOBAL_FLAGS} (hyphens, not spaces), got "
                                 f"{self.global_flg!r}")
            if self.clip_ratio_c <= 1:
                raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {self.clip_ratio_c}")
            if not 0 < self.epsilon < 1 or self.epsilon_high <= 0:
                raise ValueError(f"epsilon must be in (0, 1) and epsilon_high > 0, got {self.epsilon}, "
                                 f"{self.epsilon_high}")

    def group_statistics(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Per completion [N]: A_loc, A_glob, H(q) (bits), R_glob(q), w(q), and the blend weight w_i."""
        if batch.answers is None:
            raise ValueError("COPO needs the extracted final answer of every completion (RolloutBatch.answers).")
        p = self.params
        rewards = batch.rewards.detach().to(torch.float64)
        inverse, counts = group_ids(batch.group_index)
        n_groups = counts.shape[0]
        if n_groups < 2:
            raise ValueError(f"COPO's global advantage normalises across prompts: the rollout batch must hold at "
                             f"least 2 prompts, got {n_groups} (its std over one prompt is undefined).")
        a_loc = torch.zeros_like(rewards)
        entropy = torch.zeros(n_groups, dtype=torch.float64)
        r_glob = torch.zeros(n_groups, dtype=torch.float64)
        for g in range(n_groups):
            rows = (inverse == g).nonzero(as_tuple=True)[0]
            r = rewards[rows]
            n = rows.numel()
            if n == 1:  # verl: mean 0, std 1
                a_loc[rows] = r / (1.0 + 1e-6)
            else:
                a_loc[rows] = (r - r.mean()) / (r.std(correction=1) + 1e-6)
            entropy[g] = answer_entropy_bits([batch.answers[i] for i in rows.tolist()])
            coef = 1.0
            if p.reward_coef_flg and n > 1:
                coef = 1.0 - (1.0 - 1.0 / n) / math.log2(n) * float(entropy[g])
            r_glob[g] = r.mean() * coef
        a_glob = ((r_glob - r_glob.mean()) / (r_glob.std(correction=1) + 1e-6))[inverse]
        h = entropy[inverse]
        w_q = torch.sigmoid(p.k * (h - p.b))
        flag = p.global_flg
        not_zero = (rewards != 0).to(rewards.dtype)
        forced = (a_loc != 0).to(rewards.dtype)
        local_weight = {
            "soft-with-zero": w_q * not_zero, "only-soft": w_q, "soft-with-forced": w_q * forced,
            "only-zero": not_zero, "only-forced": forced, "only-global": torch.zeros_like(w_q),
            "no-global": torch.ones_like(w_q), "only-soft-with-coef": w_q,
        }[flag]
        return {"local": a_loc, "global": a_glob, "entropy": h, "global_reward": r_glob[inverse], "w": w_q,
                "local_weight": local_weight}

    def compute_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """[N, 3]: columns (A_loc, A_glob, local blend weight w_i), float64."""
        s = self.group_statistics(batch)
        return torch.stack([s["local"], s["global"], s["local_weight"]], dim=1)

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        p = self.params
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        adv = inputs.advantages.detach().to(lp.dtype)
        if adv.dim() != 2 or adv.shape[1] != 3:
            raise ValueError(f"COPO's advantages are [N, 3] (A_loc, A_glob, w_i) from compute_advantages, got "
                             f"{tuple(adv.shape)}")
        a_loc, a_glob, w_loc = adv[:, :1], adv[:, 1:2], adv[:, 2:3]
        w_glob = 1 - w_loc
        if p.global_flg == "only-soft-with-coef":
            w_glob = w_glob * p.global_loss_coef
        ratio = torch.exp(inputs.log_ratio())
        loss_g, _ = ppo_clip(ratio, a_glob, p.epsilon, p.epsilon_high, p.clip_ratio_c)
        loss_l, _ = ppo_clip(ratio, a_loc, p.epsilon, p.epsilon_high, p.clip_ratio_c)
        token_loss = w_glob * loss_g + w_loc * loss_l  # w_loc is 1 for no-global, 0 for only-global
        values, _ = per_completion(token_loss, mask, "seq_mean_token_mean")
        metrics = {"copo/completion_loss": values.detach(), "copo/local_weight": w_loc[:, 0],
                   "copo/global_advantage": a_glob[:, 0], "copo/local_advantage": a_loc[:, 0]}
        return LossOutput(values, metrics)
