"""posttrain: LLM post-training by preference optimisation and RL.

One unified policy-gradient core (`posttrain.core`), loss plug-ins on it (`posttrain.losses`),
one trainer (`posttrain.trainer`), evaluation of ranking accuracy (`posttrain.eval`).
"""

__version__ = "0.1.0"
