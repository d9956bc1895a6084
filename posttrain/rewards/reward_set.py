"""A recipe's rewards as one scorer: weighted terms, run in a worker pool, with every component reported.

For each completion i with example e_i and terms k (weight w_k, label name_k):
    score_i = sum_k w_k * s_k(completion_i, e_i)
components: "<name_k>" = s_k (unweighted), "<name_k>/<c>" = the term's component c, "<name_k>/timeout" = 1
when the call ran past the limit (then s_k = 0 and the term's declared components are 0), else 0.
answer: the answer of the first term (in recipe order) that extracted one.
A term that raises stops the batch with a RewardError naming the term, the example's file and row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

from posttrain.errors import RecipeError
from posttrain.rewards.base import RewardError, RewardFunction, RewardResult
from posttrain.examples import PromptExample
from posttrain.rewards.pool import TIMEOUT, CallFailed, InlineRunner, WorkerPool
from posttrain.rewards.registry import RewardTerm, build_reward_functions, importable_term


class RewardSet:
    """`score(completions, examples)` -> one RewardResult per completion (rules in the module docstring).
    `names`: the component names, in a stable order: each term's declared ones, then any a user reward
    reports for the first time, appended. A result lacks a name that does not apply to its example (json's
    `schema` for an example without a schema): average each name over the results that hold it.
    `timeouts`: calls that ran past the limit so far."""

    def __init__(self, terms: list[RewardTerm], functions: list[RewardFunction],
                 runner: Union[WorkerPool, InlineRunner]):
        self.terms, self._functions, self._runner = terms, functions, runner
        self.timeouts = 0
        self._names: list[str] = []
        for term, function in zip(terms, functions):
            label = term.display_name
            self._names += [label] + [f"{label}/{c}" for c in function.components] + [f"{label}/timeout"]

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def score(self, completions: list[str], examples: list[PromptExample]) -> list[RewardResult]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        for completion in completions:
            if not isinstance(completion, str):
                raise TypeError(f"completions must be strings, got {type(completion).__name__}")
        num_terms = len(self.terms)
        calls = [(k, completion, example) for completion, example in zip(completions, examples)
                 for k in range(num_terms)]
        outcomes = self._runner.run(calls)
        for (k, completion, example), outcome in zip(calls, outcomes):
            if isinstance(outcome, CallFailed):
                raise RewardError(f"reward {self.terms[k].display_name!r} failed on {example.where} (completion "
                                  f"{completion[:80]!r}{'...' if len(completion) > 80 else ''}): {outcome.message}")
        return [self._combine(outcomes[i * num_terms:(i + 1) * num_terms]) for i in range(len(completions))]

    def _combine(self, outcomes: list) -> RewardResult:
        total, answer, components = 0.0, None, {}
        for term, function, outcome in zip(self.terms, self._functions, outcomes):
            label = term.display_name
            timed_out = outcome is TIMEOUT
            if timed_out:
                self.timeouts += 1
                outcome = RewardResult(0.0, None, dict.fromkeys(function.components, 0.0))
            total += term.weight * outcome.score
            answer = outcome.answer if answer is None else answer
            components[label] = outcome.score
            for name, value in outcome.components.items():
                components[f"{label}/{name}"] = value
            components[f"{label}/timeout"] = float(timed_out)
        for name in components:
            if name not in self._names:
                self._names.append(name)
        return RewardResult(total, answer, components)

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_reward_set(terms: Iterable[Union[RewardTerm, dict]], num_workers: int = 2, timeout_s: float = 10.0,
                     search_dirs: Iterable[Path] = ()) -> RewardSet:
    """Check the terms, build their functions, and start the workers (`num_workers: 0`: inline)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise RecipeError(f"rewards: num_workers must be an integer >= 0 (0 = in the main process), got "
                          f"{num_workers!r}.")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise RecipeError(f"rewards: timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    search_dirs = list(search_dirs)
    terms, functions = build_reward_functions(terms, search_dirs)
    if num_workers == 0:
        runner = InlineRunner(functions, [t.display_name for t in terms], float(timeout_s))
    else:
        worker_terms = [importable_term(t, f, i) for i, (t, f) in enumerate(zip(terms, functions))]
        runner = WorkerPool(worker_terms, num_workers, float(timeout_s), search_dirs)
    return RewardSet(terms, functions, runner)
