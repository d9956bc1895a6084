"""Held-out evaluation during training: the section-11 numbers of the policy against its reference,
logged like the training metrics (`eval/...` in metrics.jsonl and TensorBoard), and the latest
report written to `<output_dir>/eval/` (report.json, pairs.jsonl, summary.md, plots with the
accuracy over the steps so far against R*).

The reference's held-out log-probs do not change during training; they are computed once and kept.
Each process scores an equal shard of the pairs; the scores are gathered on every process.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from posttrain.data.tokenize import TokenizedPair
from posttrain.eval.metrics import flat_metrics
from posttrain.eval.ranking import PairScores, choose_layout, score_pairs


class TrainerReference:
    """The trainer's reference as a log-prob callable for `score_pairs`: the separate reference model,
    or the policy inside the reference context (adapters off, or the frozen starting adapter). A loss
    without a reference still gets one with LoRA: the policy with its adapters switched off."""

    def __init__(self, trainer):
        self.trainer = trainer

    @staticmethod
    def available(trainer) -> bool:
        return trainer.ref_model is not None or trainer.reference.kind in ("adapter_off", "reference_adapter") or \
            (trainer.reference.kind == "none" and trainer.recipe.lora.enabled)

    @property
    def module(self):  # lets score_pairs find the transformers config
        return self.trainer.ref_model if self.trainer.ref_model is not None else self.trainer.model

    @property
    def training(self) -> bool:
        return self.trainer.model.training

    def eval(self):
        self.trainer.model.eval()
        return self

    def train(self, mode: bool = True):
        self.trainer.model.train(mode)
        return self

    def parameters(self):
        return self.module.parameters()

    def __call__(self, input_ids, attention_mask, loss_mask, position_ids=None):
        t = self.trainer
        if t.ref_model is not None:
            return t.ref_model(input_ids, attention_mask, loss_mask, position_ids)
        context = (t.peft_model.disable_adapter() if t.reference.kind == "none"
                   else t.reference.context(t.peft_model))
        with context:
            return t.model(input_ids, attention_mask, loss_mask, position_ids)


def sharded_scores(trainer, pairs: list[TokenizedPair], logprob_model, layout: str) -> PairScores:
    """Like Trainer.score, for any log-prob callable: each process scores an equal shard (padded with
    repeats, so every process runs the same number of forward passes), then all are gathered."""
    acc = trainer.accelerator
    world, rank = trainer.world, trainer.rank
    n = len(pairs)
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    mine += [0] * (per_rank - len(mine))
    local = score_pairs(logprob_model, [pairs[i] for i in mine], trainer.pad_id, trainer.recipe.eval.batch_size,
                        progress=acc.is_main_process and trainer.recipe.logging.progress_bar,
                        autocast_bf16=trainer.recipe.train.bf16, layout=layout)
    stacked = torch.stack([local.chosen_logps, local.rejected_logps])
    if world > 1:
        stacked = acc.gather(stacked.T.contiguous().to(acc.device)).cpu().T
        order = [i for r in range(world)
                 for i in (list(range(r, n, world)) + [-1] * (per_rank - len(range(r, n, world))))]
    else:
        order = mine
    chosen, rejected = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for pos, i in enumerate(order):
        if i >= 0 and pos < stacked.shape[1]:
            chosen[i], rejected[i] = stacked[0, pos], stacked[1, pos]
    return PairScores(chosen, rejected, torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float64),
                      torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float64), local.stats)


def loss_beta(trainer) -> float:
    """The DPO-style beta of the run's loss (for difficulty thresholds and the DPO loss), else 0.1."""
    for term in trainer.recipe.loss:
        if "beta" in (term.params or {}):
            return float(term.params["beta"])
    beta = getattr(getattr(trainer.loss, "params", None), "beta", None)
    return float(beta) if isinstance(beta, (int, float)) and beta > 0 else 0.1


def _current_step(trainer) -> int:
    return int(getattr(trainer.scheduler, "last_epoch", 0))


def heldout_evaluation(trainer) -> Optional[dict]:
    """The body of Trainer.evaluate: every section-11 number on the held-out pairs, as flat scalars."""
    from posttrain.eval.api import build_report, pair_alphas, training_history

    if not trainer.heldout_pairs:
        return None
    cfg = trainer.recipe.eval
    state = trainer.__dict__.setdefault("_ranking_eval", {})
    pairs = trainer.heldout_pairs
    if "layout" not in state:
        state["layout"] = choose_layout(trainer.model, pairs, cfg.layout)
    policy = sharded_scores(trainer, pairs, trainer.model, state["layout"])
    if "reference" not in state:
        if _current_step(trainer) == 0 and trainer.reference.kind in ("adapter_off", "reference_adapter"):
            # Before the first update the policy is its reference (fresh LoRA is the identity; a
            # starting adapter is its own frozen copy): no second pass.
            state["reference"] = policy
        else:
            state["reference"] = (sharded_scores(trainer, pairs, TrainerReference(trainer), state["layout"])
                                  if TrainerReference.available(trainer) else None)
    reference = state["reference"]
    alpha = pair_alphas(pairs, cfg.alpha)
    step = _current_step(trainer)
    inputs = {"model": trainer.recipe.model.name_or_path, "adapter": None, "step": step,
              "reference": None if reference is None else f"the run's reference ({trainer.reference.kind})",
              "data": "data.heldout", "format": trainer.recipe.data.template,
              "max_length": trainer.recipe.data.max_length, "alpha_source": f"pairs' alpha field, else {cfg.alpha:g}"}
    report, records = build_report(pairs, policy, reference, alpha, inputs, betas=cfg.betas, eps=cfg.alpha_eps,
                                   tie_threshold=cfg.tie_threshold, dpo_beta=loss_beta(trainer),
                                   bootstrap=cfg.bootstrap, seed=trainer.recipe.run.seed, reference_is_policy=False,
                                   tokenizer=trainer.tokenizer if cfg.report else None)
    flat = flat_metrics(report["metrics"])
    if policy.stats is not None:
        flat["pairs_per_second"] = policy.stats.pairs_per_second
    if cfg.report and trainer.accelerator.is_main_process:
        from posttrain.eval.report import write_report

        history = [h for h in training_history(trainer.output_dir) if h["step"] != step]
        history = sorted(history + [{"step": step, **flat}], key=lambda h: h["step"])
        write_report(trainer.output_dir / "eval", report, records, history if len(history) > 1 else None)
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in flat.items()}
