"""The core: per-token log-probs and the unified policy-gradient estimator. It knows no concrete loss."""

from posttrain.core.logprobs import PolicyLogProbs, chunked_token_logprobs
from posttrain.core.unified import Normaliser, policy_gradient_surrogate, with_value

__all__ = ["PolicyLogProbs", "chunked_token_logprobs", "Normaliser", "policy_gradient_surrogate", "with_value"]
