"""HPT, Hybrid Post-Training (Lv, Zuo, Sun, et al. 2025, "Towards a Unified View of LLM Post-Training"; spec
section 10, Algorithm 1 and the authors' "switch" code, mix_trainer.py / mix_actor.py).

Per prompt, the G rollouts are scored and k of them are correct (the run's success test). Then:

    k <= gamma (switch_gate):  the rollouts are dropped and the prompt's gold demonstration y* is trained by SFT
    k >  gamma:                the rollouts are trained by the policy gradient (the authors' L_PG)

    L     = L_PG + sft_coef * L_SFT                                                   (one optimiser step)
    L_SFT = sum over the step's demonstration tokens of -lp / (demonstration tokens in the step)
    L_PG  = sum over the step's RL completions i and tokens t of -A_i rho_i,t / (RL completions * max_completion_length)
            (max_completion_length: the generation limit; null: the step's longest completion)
    A_i   = r_i - mean of its group's rewards            (grpo_use_std = False)
    rho   = exp(lp - lp_old), no clipping                 (loss_remove_clip = True)

The paper leaves the normalisation to the code. The code takes L_SFT as a token mean over the demonstration
tokens of a micro-batch and L_PG as sum(loss x mask) / max_response_length, "not divided by the number of
sequences" (loss_remove_token_mean), per micro-batch. posttrain keeps both forms but over the whole
optimiser step (so the loss does not depend on the split) and, where the code divides by nothing, divides
L_PG by the step's RL completions, so that sft_coef weighs two means of the same scale [chosen here]. Gold
demonstrations are the prompt data's `solution` field (GSM8K's worked solution, MATH's solution, the
built-in tasks' answer), tokenised as an SFT row would be. Logged: `hpt/sft_share` and `hpt/rl_share`,
the shares of the step's prompts trained each way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from posttrain.data.readers import ROW_KIND, PreferenceRow
from posttrain.data.tokenize import tokenize_pairs
from posttrain.errors import DataError
from posttrain.losses.base import LossOutput, register_loss
from posttrain.losses.group import GroupLoss, GroupLossInputs, RolloutBatch, group_normalised_advantages


def switch_to_sft(correct: int, gamma: int) -> bool:
    """HPT's switch: SFT on the gold demonstration when at most `gamma` rollouts are correct."""
    return correct <= gamma


@register_loss("hpt")
class HPTLoss(GroupLoss):
    level = "sequence"

    @dataclass
    class Params:
        switch_gate: int = 0  # gamma: SFT when at most this many of the G rollouts are correct (authors: 0; 2 for LLaMA)
        sft_coef: float = 1.0  # weight of L_SFT (authors: 1.0; 0.3 for Qwen2.5-Math-1.5B)
        # L_PG's constant denominator: set it to the generation limit (rollout.max_new_tokens), as the authors'
        # max_response_length; None takes the step's longest completion
        max_completion_length: Optional[int] = None

        def validate(self):
            if self.switch_gate < 0:
                raise ValueError(f"switch_gate must be >= 0, got {self.switch_gate}")
            if self.sft_coef < 0:
                raise ValueError(f"sft_coef must be >= 0, got {self.sft_coef}")
            if self.max_completion_length is not None and self.max_completion_length < 1:
                raise ValueError(f"max_completion_length must be a positive integer or null, got "
                                 f"{self.max_completion_length}")

    def __init__(self, params=None):
        super().__init__(params)
        self.demonstrations: dict[int, tuple[list[int], list[int], str]] = {}

    def prepare_examples(self, examples: list, tokenizer, template: str) -> None:
        """Every training prompt's gold demonstration, tokenised as an SFT row (prompt ids, completion ids)."""
        missing = next((e for e in examples if not isinstance(e.extras.get("solution"), str)
                        or not e.extras["solution"].strip()), None)
        if missing is not None:
            raise DataError(f"{missing.where}: no `solution` (the gold demonstration HPT trains on by SFT when a "
                            f"prompt's rollouts fail). Give prompt data with a solution field (GSM8K's answer, "
                            f"MATH's solution, or `solution` beside `prompt`), or use another loss.")
        rows = [PreferenceRow(e.prompt, e.extras["solution"], "", e.source, e.row,
                              {**e.extras, ROW_KIND: "demonstration"})
                for e in examples]
        pairs, too_long, _ = tokenize_pairs(rows, tokenizer, template, max_length=10 ** 9)
        if too_long:
            raise DataError(f"{too_long[0].source}, row {too_long[0].row}: the gold solution could not be tokenised.")
        self.demonstrations = {i: (p.prompt_ids, p.chosen_ids, e.extras["solution"])
                               for i, (p, e) in enumerate(zip(pairs, examples))}

    def prepare_rollouts(self, records: list) -> tuple[list, dict]:
        """Groups with at most `switch_gate` correct rollouts become one demonstration record each."""
        groups: dict[int, list] = {}
        for rec in records:
            groups.setdefault(rec.group, []).append(rec)
        out, sft = [], 0
        for members in groups.values():
            if switch_to_sft(sum(rec.success for rec in members), self.params.switch_gate):
                prompt_ids, completion_ids, text = self.demonstrations[members[0].index]
                out.append(replace(members[0], prompt_ids=list(prompt_ids), completion_ids=list(completion_ids),
                                   truncated=False, text=text, demonstration=True))
                sft += 1
            else:
                out += members
        share = sft / max(len(groups), 1)
        return out, {"hpt/sft_share": share, "hpt/rl_share": 1.0 - share}

    def compute_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """Per completion [N, 3]: (A = r - group mean, 1 for a demonstration, its term's scale), where the scale
        turns the core's mean over the step's N completions into L_PG + sft_coef L_SFT."""
        p = self.params
        demo = batch.extras["demonstration"].to(torch.bool)
        n, n_rl = float(len(batch.rewards)), float((~demo).sum())
        demo_tokens = float(batch.mask[demo].sum()) if demo.any() else 0.0
        adv = torch.where(demo, torch.zeros_like(batch.rewards),
                          group_normalised_advantages(batch.rewards, batch.group_index, "none"))
        max_length = p.max_completion_length or batch.mask.shape[1]
        rl_scale = n / (n_rl * max_length) if n_rl else 0.0
        sft_scale = p.sft_coef * n / demo_tokens if demo_tokens else 0.0
        scale = torch.where(demo, torch.full_like(adv, sft_scale), torch.full_like(adv, rl_scale))
        return torch.stack([adv, demo.to(adv.dtype), scale], dim=1)

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        adv, demo, scale = (inputs.advantages[:, k].to(lp.dtype) for k in range(3))
        rho = torch.exp(inputs.log_ratio())
        policy_gradient = (-adv[:, None] * rho * mask).sum(-1)
        sft = (-lp * mask).sum(-1)
        per_row = torch.where(demo > 0, sft, policy_gradient) * scale
        return LossOutput(per_row, {"hpt/demonstration": demo})
