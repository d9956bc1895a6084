"""Evaluation: ranking accuracy and its relatives (Chen et al. 2024; spec section 11)."""

from posttrain.eval.ranking import PairScores, score_pairs

__all__ = ["PairScores", "score_pairs"]
