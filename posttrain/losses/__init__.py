"""Loss plug-ins. Importing this package registers the built-in losses."""

from posttrain.losses.base import LOSSES, LossOutput, LossPlugin, PairLossInputs, register_loss, sequence_means, sequence_sums
from posttrain.losses.group import ADVANTAGE_ESTIMATORS, AdvantageEstimator, GroupLoss, GroupLossInputs, RolloutBatch
from posttrain.losses.registry import CombinedLoss, build_loss, get_loss_class
from posttrain.losses import copo, cpo, dpo, gmpo, grpo, gtpo, hpt, kto, online_pairs, orpo, rdpo, rpo, sft, simpo, tabpo  # noqa: F401  (registration)

__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "CombinedLoss", "GroupLoss", "GroupLossInputs", "LOSSES",
           "LossOutput", "LossPlugin", "PairLossInputs", "RolloutBatch", "build_loss", "get_loss_class",
           "register_loss", "sequence_means", "sequence_sums"]
