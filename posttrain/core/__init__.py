"""The core: per-token log-probs, global aggregation and the one gradient path. It knows no concrete loss."""

from posttrain.core.logprobs import PolicyLogProbs, chunked_token_logprobs
from posttrain.core.unified import StepCounts, StepLoss, aggregate, backward_through_coefficients

__all__ = ["PolicyLogProbs", "StepCounts", "StepLoss", "aggregate", "backward_through_coefficients",
           "chunked_token_logprobs"]
