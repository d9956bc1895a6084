"""Loss plug-ins. Importing this package registers the built-in losses."""

from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs, sequence_means, sequence_sums
from posttrain.losses.registry import (LOSSES, CombinedLoss, build_loss, get_loss_class, register_loss,
                                       validate_loss_terms)
from posttrain.losses import copo, dpo, grpo, gtpo, rdpo, rpo, sft, simpo, tabpo  # noqa: F401  (registration)

__all__ = ["LOSSES", "CombinedLoss", "LossOutput", "LossPlugin", "PairLossInputs", "build_loss", "get_loss_class",
           "register_loss", "sequence_means", "sequence_sums", "validate_loss_terms"]
