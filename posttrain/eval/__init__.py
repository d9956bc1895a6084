"""Evaluation: ranking accuracy and its relatives (Chen et al. 2024; spec section 11), reports, and the
gradient-entanglement diagnostic (spec section 12). See docs/evaluation.md."""

from posttrain.eval.entanglement import entanglement_metrics, gradient_entanglement
from posttrain.eval.metrics import flat_metrics, ranking_metrics
from posttrain.eval.ranking import PairScores, ScoringStats, choose_layout, score_pairs

__all__ = ["PairScores", "ScoringStats", "choose_layout", "score_pairs", "ranking_metrics", "flat_metrics",
           "entanglement_metrics", "gradient_entanglement"]
