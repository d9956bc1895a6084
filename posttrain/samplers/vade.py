"""VADE, Variance-Aware Dynamic Sampling (Hu, Qiu, Bai, et al. 2025, arXiv 2511.18902); spec section 9.

A non-stationary Bernoulli bandit over training samples: sample i keeps counts (alpha_i, beta_i),
initialised to 0 (a uniform Beta(1, 1) prior) [assumed]. Each step:

    Thompson draw     p~_i ~ Beta(alpha_i + 1, beta_i + 1) for every sample (one seeded numpy Generator)
    information gain  I_i = p~_i (1 - p~_i)^2                   maximal at p = 1/3 (not the symmetric p(1-p))
    select            the top-B samples by I (ties: lower index first), in decreasing I
    update            selected:   alpha <- lambda1 alpha + r,  beta <- lambda1 beta + (G - r)   (r = #correct of G)
                      unselected: alpha <- lambda2 alpha,      beta <- lambda2 beta          (every other sample)

lambda1 = 0.2 and lambda2 = 0.999 reproduce the paper figure's numbers exactly but are not stated in
the retrievable text [inferred; the authors' code was not available]. All updates are vectorised
(O(N) numpy per step). `update` treats the indices it is given as the selected ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from posttrain.samplers.base import SAMPLERS, PromptSampler


def information_gain(p: np.ndarray) -> np.ndarray:
    """I(p) = p (1 - p)^2."""
    p = np.asarray(p, dtype=np.float64)
    return p * (1.0 - p) ** 2


def top_b(scores: np.ndarray, batch_size: int) -> list[int]:
    """Indices of the `batch_size` largest scores, largest first; ties go to the lower index."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:batch_size]]


@SAMPLERS.register("vade")
class VADESampler(PromptSampler):
    @dataclass
    class Params:
        lambda1: float = 0.2  # decay of a selected sample's counts before its new results are added
        lambda2: float = 0.999  # decay of every unselected sample's counts

        def validate(self):
            if not 0 <= self.lambda1 <= 1 or not 0 <= self.lambda2 <= 1:
                raise ValueError(f"lambda1 and lambda2 are decay factors in [0, 1], got {self.lambda1}, "
                                 f"{self.lambda2}")

    def __init__(self, num_items: int, seed: int = 0, lambda1: float = 0.2, lambda2: float = 0.999):
        super().__init__(num_items, seed)
        self.Params(lambda1, lambda2).validate()
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.alpha = np.zeros(self.num_items, dtype=np.float64)
        self.beta = np.zeros(self.num_items, dtype=np.float64)

    def draw(self) -> np.ndarray:
        """One Thompson draw p~ ~ Beta(alpha + 1, beta + 1) per sample [N] (advances the RNG)."""
        return self.rng.beta(self.alpha + 1.0, self.beta + 1.0)

    def posterior_mean(self) -> np.ndarray:
        return (self.alpha + 1.0) / (self.alpha + self.beta + 2.0)

    def select(self, batch_size: int) -> list[int]:
        self._check_batch_size(batch_size)
        return top_b(information_gain(self.draw()), batch_size)

    def update(self, indices: Sequence[int], successes: Sequence[float], group_size: int) -> None:
        idx, succ = self._check_update(indices, successes, group_size)
        selected = np.zeros(self.num_items, dtype=bool)
        selected[idx] = True
        self.alpha[~selected] *= self.lambda2
        self.beta[~selected] *= self.lambda2
        self.alpha[idx] = self.lambda1 * self.alpha[idx] + succ
        self.beta[idx] = self.lambda1 * self.beta[idx] + (group_size - succ)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lambda1": self.lambda1, "lambda2": self.lambda2,
                "alpha": self.alpha.tolist(), "beta": self.beta.tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lambda1, self.lambda2 = float(state["lambda1"]), float(state["lambda2"])
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.beta = np.asarray(state["beta"], dtype=np.float64)
