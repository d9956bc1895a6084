"""Built-in generated preference tasks, so that the main job and the tests need no download.

`arithmetic` (for SmolLM2): "What is a + b?" with two-digit operands. The chosen answer is the sum;
the rejected answer is the sum with its units digit off by one: sum + 1 when a is even, sum - 1
when a is odd (or the other way where that would change the number of digits). Both answers are
bare numbers of the same number of digits, so they have the same formatting and token length
(SmolLM2 tokenises digits one by one). Operand pairs are split by a hash into train (about 80%)
and held-out (about 20%): no (a, b) of the held-out split occurs in training. Untrained
SmolLM2-135M-Instruct ranks about 61% of held-out pairs correctly with the chat template.

`addition` (for online RL on SmolLM2): "What is a + b? Answer with the number only." with operands
1 to 40, the answer the sum (rejected: `wrong_sum`). About 20% of the 1,600 operand pairs are held
out by the same hash rule (about 320 prompts). Untrained SmolLM2-135M-Instruct answers about 31% of
them correctly when greedy with 16 new tokens and the chat template (it often explains instead of
answering, or runs out of tokens): a task with room to learn from verifiable rewards.

`two_digit_addition` (for the HPT claim on SmolLM2): the `addition` prompt with operands 10 to 99, the
answer the sum. About 20% of the 8,100 operand pairs are held out by the same hash rule. Untrained
SmolLM2-135M-Instruct answers about 10% of held-out prompts correctly when greedy with 16 new tokens and
the chat template (measured: 10 of 96 random prompts): hard enough that many prompts have no correct
rollout in a group of 8, which is where HPT switches to SFT.

`tiny` (for tests with tiny random models): the prompt is a short string of digits; the chosen
answer is the last digit plus one (mod 10), the rejected answer the last digit plus five (mod 10).
A tiny model learns it in a few dozen steps. Held-out prompts are disjoint from training prompts.
"""

from __future__ import annotations

import hashlib
import random

from posttrain.data.readers import PreferenceRow
from posttrain.errors import RecipeError


def _split_of(key: str, heldout_share: float = 0.2) -> str:
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "heldout" if digest / 0xFFFFFFFF < heldout_share else "train"


def wrong_sum(a: int, total: int) -> int:
    """The arithmetic task's fixed rule for a wrong answer (same number of digits as `total`)."""
    candidate = total + 1 if a % 2 == 0 else total - 1
    if len(str(candidate)) != len(str(total)):
        candidate = total - 1 if candidate > total else total + 1
    return candidate


def arithmetic_rows(split: str) -> list[PreferenceRow]:
    rows = []
    for a in range(10, 100):
        for b in range(10, 100):
            if _split_of(f"{a}+{b}") != split:
                continue
            total = a + b
            rows.append(PreferenceRow(f"What is {a} + {b}?", str(total), str(wrong_sum(a, total)),
                                      f"builtin:arithmetic/{split}", len(rows) + 1, {"a": a, "b": b}))
    return rows


def _sum_prompt_rows(task: str, operands: range, key: str, split: str) -> list[PreferenceRow]:
    """'What is a + b? Answer with the number only.' for every operand pair of `split`; chosen: the sum."""
    rows = []
    for a in operands:
        for b in operands:
            if _split_of(f"{key}:{a}+{b}") != split:
                continue
            total = a + b
            rows.append(PreferenceRow(f"What is {a} + {b}? Answer with the number only.", str(total),
                                      str(wrong_sum(a, total)), f"builtin:{task}/{split}", len(rows) + 1,
                                      {"a": a, "b": b}))
    return rows


def addition_rows(split: str) -> list[PreferenceRow]:
    return _sum_prompt_rows("addition", range(1, 41), "add", split)


def two_digit_addition_rows(split: str) -> list[PreferenceRow]:
    return _sum_prompt_rows("two_digit_addition", range(10, 100), "add2", split)


def tiny_rows(split: str) -> list[PreferenceRow]:
    rows = []
    for n in range(1000, 10000):
        prompt = " ".join(str(n))
        if _split_of(prompt, 0.1) != split:
            continue
        last = n % 10
        rows.append(PreferenceRow(prompt, str((last + 1) % 10), str((last + 5) % 10), f"builtin:tiny/{split}",
                                  len(rows) + 1))
    return rows


TASKS = {"arithmetic": arithmetic_rows, "addition": addition_rows, "two_digit_addition": two_digit_addition_rows,
         "tiny": tiny_rows}


def builtin_rows(name: str, split: str, num_rows: int | None = None, seed: int = 0) -> list[PreferenceRow]:
    """Rows of a built-in task, shuffled with `seed` and cut to `num_rows` (all when None)."""
    if name not in TASKS:
        raise RecipeError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}.")
    if split not in ("train", "heldout"):
        raise RecipeError(f"built-in task {name!r}: split must be 'train' or 'heldout', got {split!r}.")
    rows = TASKS[name](split)
    random.Random(f"{name}/{split}/{seed}").shuffle(rows)
    if num_rows is not None:
        if num_rows > len(rows):
            raise RecipeError(f"built-in task {name!r} has {len(rows)} {split} rows; num_rows={num_rows} is too many.")
        rows = rows[:num_rows]
    return rows
