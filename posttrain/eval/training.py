"""Held-out evaluation during training: the section-11 numbers of the policy against its reference,
logged like the training metrics (`eval/...` in metrics.jsonl and TensorBoard), and the latest
report written to `<output_dir>/eval/` (report.json, pairs.jsonl, summary.md, plots with the
accuracy over the steps so far against R*).

The reference's held-out log-probs do not change during training; they are computed once and kept.
Each process scores an equal round-robin shard of the pairs; the scores are gathered on every process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from posttrain.data.tokenize import TokenizedPair
from posttrain.eval.metrics import flat_metrics
from posttrain.eval.ranking import PairScores, choose_layout, score_pairs
from posttrain.plan import round_robin


class ReferenceScorer:
    """The run's reference as a log-prob callable for `score_pairs` (posttrain.models.Reference, used inside
    the policy or as the separate scorer), with the parameters and mode of the model it runs on."""

    def __init__(self, model, peft_model, reference):
        self.model, self.peft_model, self.reference = model, peft_model, reference

    @property
    def module(self):  # lets score_pairs find the transformers config
        return self.reference.scorer if self.reference.scorer is not None else self.model

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def parameters(self):
        return self.module.parameters()

    def __call__(self, input_ids, attention_mask, loss_mask, position_ids=None):
        return self.reference.log_probs(self.model, self.peft_model(), input_ids, attention_mask, loss_mask,
                                        position_ids)


def sharded_scores(accelerator, pairs: list[TokenizedPair], logprob_model, layout: str, pad_id: int,
                   batch_size: int, progress: bool, bf16: bool) -> PairScores:
    """Each process scores an equal round-robin shard of the pairs (padded with repeats, so every process runs
    the same number of forward passes), then all are gathered."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(pairs)
    mine = round_robin(range(n), rank, world, filler=0)
    local = score_pairs(logprob_model, [pairs[i] for i in mine], pad_id, batch_size,
                        progress=progress and accelerator.is_main_process, autocast_bf16=bf16, layout=layout)
    stacked = torch.stack([local.chosen_logps, local.rejected_logps])
    if world > 1:
        stacked = accelerator.gather(stacked.T.contiguous().to(accelerator.device)).cpu().T
        order = [i for r in range(world) for i in round_robin(range(n), r, world, filler=-1)]
    else:
        order = mine
    chosen = torch.zeros(n, dtype=torch.float64, device="cpu")
    rejected = torch.zeros(n, dtype=torch.float64, device="cpu")
    for pos, i in enumerate(order):
        if i >= 0 and pos < stacked.shape[1]:
            chosen[i], rejected[i] = stacked[0, pos], stacked[1, pos]
    return PairScores(chosen, rejected, torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float64),
                      torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float64), local.stats)


def loss_beta(loss_terms, loss) -> float:
    """The DPO-style beta of the run's loss (for difficulty thresholds and the DPO loss), else 0.1."""
    for term in loss_terms:
        if "beta" in (term.params or {}):
            return float(term.params["beta"])
    beta = getattr(getattr(loss, "params", None), "beta", None)
    return float(beta) if isinstance(beta, (int, float)) and beta > 0 else 0.1


class HeldoutRanking:
    """Every section-11 number on the held-out pairs, as flat scalars, at any step of a run. Keeps the row
    layout and the reference's scores (they do not change during training) between calls."""

    def __init__(self, accelerator, model, peft_model, reference, pairs: list[TokenizedPair], pad_id: int, recipe,
                 loss, tokenizer, output_dir: Path):
        self.accelerator, self.model, self.pairs, self.pad_id = accelerator, model, pairs, pad_id
        self.recipe, self.loss, self.tokenizer, self.output_dir = recipe, loss, tokenizer, Path(output_dir)
        self.reference = reference.for_evaluation(recipe.lora.enabled)
        self.reference_scorer = ReferenceScorer(model, peft_model, self.reference)
        self.layout = choose_layout(model, pairs, recipe.eval.layout) if pairs else None
        self.reference_scores: Optional[PairScores] = None
        self.scored_reference = False

    def scores(self, logprob_model) -> PairScores:
        return self._scores(self.pairs, logprob_model, self.layout)

    def scores_of(self, pairs: list[TokenizedPair]) -> PairScores:
        """The current policy's scores of any pairs (benchmarks' and claims' own sets)."""
        return self._scores(pairs, self.model, choose_layout(self.model, pairs, self.recipe.eval.layout))

    def _scores(self, pairs, logprob_model, layout) -> PairScores:
        return sharded_scores(self.accelerator, pairs, logprob_model, layout, self.pad_id, self.recipe.eval.batch_size,
                              self.recipe.logging.progress_bar, self.recipe.autocast_bf16)

    def __call__(self, step: int) -> Optional[dict]:
        from posttrain.eval.api import build_report, pair_alphas, training_history

        if not self.pairs:
            return None
        cfg, pairs = self.recipe.eval, self.pairs
        policy = self.scores(self.model)
        if not self.scored_reference:
            self.scored_reference = True
            if step == 0 and self.reference.kind in ("adapter_off", "reference_adapter"):
                # Before the first update the policy is its reference (fresh LoRA is the identity; a
                # starting adapter is its own frozen copy): no second pass.
                self.reference_scores = policy
            elif self.reference.available:
                self.reference_scores = self.scores(self.reference_scorer)
        reference = self.reference_scores
        inputs = {"model": self.recipe.model.name_or_path, "adapter": None, "step": step,
                  "reference": None if reference is None else f"the run's reference ({self.reference.kind})",
                  "data": "data.heldout", "format": self.recipe.data.template,
                  "max_length": self.recipe.data.max_length,
                  "alpha_source": f"pairs' alpha field, else {cfg.alpha:g}"}
        report, records = build_report(pairs, policy, reference, pair_alphas(pairs, cfg.alpha), inputs,
                                       betas=cfg.betas, eps=cfg.alpha_eps, tie_threshold=cfg.tie_threshold,
                                       dpo_beta=loss_beta(self.recipe.loss, self.loss), bootstrap=cfg.bootstrap,
                                       seed=self.recipe.run.seed, reference_is_policy=False,
                                       tokenizer=self.tokenizer if cfg.report else None)
        flat = flat_metrics(report["metrics"])
        if policy.stats is not None:
            flat["pairs_per_second"] = policy.stats.pairs_per_second
        if cfg.report and self.accelerator.is_main_process:
            from posttrain.eval.report import write_report

            history = [h for h in training_history(self.output_dir) if h["step"] != step]
            history = sorted(history + [{"step": step, **flat}], key=lambda h: h["step"])
            write_report(self.output_dir / "eval", report, records, history if len(history) > 1 else None)
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in flat.items()}
