"""Read prompt data sets for online RL: prompts with a ground-truth answer, from JSONL, JSON or parquet.

Formats (detected from the first row's fields, or fixed by `format:`):
- "gsm8k": `question`, `answer` = a worked solution ending in "#### <final answer>". The answer is the text
  after the last "####" with commas and spaces removed ("1,000" -> "1000"); the full solution is kept in
  extras["solution"]. Detected by `question`.
- "math": `problem`, `answer` (LaTeX, MATH-500 style); `solution`, `level`, `subject`, ... go to extras.
  Detected by `problem`.
- "rl": verl's RL parquet (DeepScaleR, One-Shot-RLVR): `prompt` as chat messages, the answer in
  `reward_model.ground_truth` (a nested column). Detected by `reward_model`.
- "prompt_answer": `prompt` (text or chat messages) and an optional answer, read from the first of `answer`,
  `ground_truth`, `solution` that the row has (an answer given as a JSON object or list is kept as its JSON
  text, for the `json` reward). Every other field goes to extras (e.g. `schema`, `gold`), and `solution` always
  does (a gold demonstration, for HPT). Detected by `prompt`.
- "builtin:<task>" as the path (not a format): the built-in generated tasks of posttrain.data.tasks
  (`arithmetic`, `tiny`) as prompts, the chosen answer as the ground truth and as extras["solution"]; `split` is
  train or heldout.

A number given as the answer (JSON `12`) is read as its text ("12"). Every row is validated: a non-empty
prompt, and an answer where the format demands one (gsm8k, math, rl). A bad row is reported with the file,
the row number (1-based) and the field; with `invalid_rows: skip` it is left out, counted, logged and
appended to `skipped_path` (JSON Lines), never silently dropped. `start`/`limit` then select from the
valid examples, in file order.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

from posttrain.data.readers import (InvalidRow, handle_invalid, is_messages, message_problem, parse_records,
                                   write_skipped_rows)
from posttrain.errors import DataError, RecipeError
from posttrain.examples import PromptExample

__all__ = ["PROMPT_FORMATS", "PromptExample", "detect_prompt_format", "load_prompt_examples"]

GSM8K_MARK = "####"
ANSWER_ALIASES = ("answer", "ground_truth", "solution")
Parsed = Union[PromptExample, InvalidRow]


def _missing(record: dict) -> str:
    return f"missing field (the row has fields {sorted(record)})"


def _check_prompt(value: Any, source: str, row: int, name: str) -> Optional[InvalidRow]:
    if isinstance(value, str):
        return None if value.strip() else InvalidRow(source, row, name, "empty prompt")
    if is_messages(value):
        if not value:
            return InvalidRow(source, row, name, "empty prompt (no messages)")
        if message_problem(value):
            return InvalidRow(source, row, name, message_problem(value))
        if not any(message["content"].strip() for message in value):
            return InvalidRow(source, row, name, "empty prompt (every message is empty)")
        return None
    return InvalidRow(source, row, name, f"must be a string or a list of {{role, content}} messages, got "
                                         f"{type(value).__name__}")


def _answer_text(value: Any, source: str, row: int, name: str, required: bool) -> Union[Optional[str], InvalidRow]:
    """The answer as a string: text as is, a number as its text, None where allowed."""
    if value is None:
        return InvalidRow(source, row, name, "missing answer (null)") if required else None
    if isinstance(value, bool):
        return InvalidRow(source, row, name, f"must be a string or a number, got {value!r}")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        return InvalidRow(source, row, name, f"must be a string or a number, got {type(value).__name__}")
    if not value.strip():
        return InvalidRow(source, row, name, "empty answer")
    return value.strip()


def _parse_gsm8k(record: dict, source: str, row: int) -> Parsed:
    for name in ("question", "answer"):
        if name not in record:
            return InvalidRow(source, row, name, _missing(record))
    bad = _check_prompt(record["question"], source, row, "question")
    if bad:
        return bad
    solution = record["answer"]
    if not isinstance(solution, str):
        return InvalidRow(source, row, "answer", f"must be a string, got {type(solution).__name__}")
    if GSM8K_MARK not in solution:
        return InvalidRow(source, row, "answer", f"no {GSM8K_MARK!r} before the final answer")
    final = solution.rsplit(GSM8K_MARK, 1)[1].strip().replace(",", "").replace(" ", "")
    if not final:
        return InvalidRow(source, row, "answer", f"empty final answer after {GSM8K_MARK!r}")
    extras = {k: v for k, v in record.items() if k not in ("question", "answer")}
    return PromptExample(record["question"], final, source, row, {"solution": solution, **extras})


def _parse_math(record: dict, source: str, row: int) -> Parsed:
    for name in ("problem", "answer"):
        if name not in record:
            return InvalidRow(source, row, name, _missing(record))
    bad = _check_prompt(record["problem"], source, row, "problem")
    if bad:
        return bad
    answer = _answer_text(record["answer"], source, row, "answer", required=True)
    if isinstance(answer, InvalidRow):
        return answer
    extras = {k: v for k, v in record.items() if k not in ("problem", "answer")}
    return PromptExample(record["problem"], answer, source, row, extras)


def _parse_rl(record: dict, source: str, row: int) -> Parsed:
    for name in ("prompt", "reward_model"):
        if name not in record:
            return InvalidRow(source, row, name, _missing(record))
    bad = _check_prompt(record["prompt"], source, row, "prompt")
    if bad:
        return bad
    reward_model = record["reward_model"]
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        return InvalidRow(source, row, "reward_model.ground_truth", "missing field (reward_model must be a "
                                                                    "mapping with a ground_truth)")
    answer = _answer_text(reward_model["ground_truth"], source, row, "reward_model.ground_truth", required=True)
    if isinstance(answer, InvalidRow):
        return answer
    extras = {k: v for k, v in record.items() if k not in ("prompt", "reward_model")}
    extras["reward_model"] = {k: v for k, v in reward_model.items() if k != "ground_truth"}
    return PromptExample(record["prompt"], answer, source, row, extras)


def _parse_prompt_answer(record: dict, source: str, row: int) -> Parsed:
    if "prompt" not in record:
        return InvalidRow(source, row, "prompt", _missing(record))
    bad = _check_prompt(record["prompt"], source, row, "prompt")
    if bad:
        return bad
    key = next((name for name in ANSWER_ALIASES if name in record), None)
    answer = None
    if key is not None:
        value = record[key]
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        answer = _answer_text(value, source, row, key, required=False)
        if isinstance(answer, InvalidRow):
            return answer
    extras = {k: v for k, v in record.items() if k not in ("prompt", key) or k == "solution"}
    return PromptExample(record["prompt"], answer, source, row, extras)


PROMPT_FORMATS: dict[str, Callable[[dict, str, int], Parsed]] = {
    "gsm8k": _parse_gsm8k,
    "math": _parse_math,
    "rl": _parse_rl,
    "prompt_answer": _parse_prompt_answer,
}


def detect_prompt_format(record: Any, source: str, row: int = 1) -> str:
    """The format of a file, from its first record (see the module docstring for the fields that decide)."""
    if not isinstance(record, dict):
        raise DataError(f"{source}, row {row}: expected a JSON object, got {type(record).__name__}.")
    for name, kind in (("reward_model", "rl"), ("question", "gsm8k"), ("problem", "math"), ("prompt", "prompt_answer")):
        if name in record:
            return kind
    raise DataError(
        f"{source}, row {row}: cannot tell the prompt format from fields {sorted(record)}. posttrain reads "
        f"gsm8k (question, answer with '#### N'), math (problem, answer), rl (prompt messages, "
        f"reward_model.ground_truth) and prompt_answer (prompt, answer); rename your fields or set `format:`."
    )


def _builtin_examples(name: str, split: str) -> list[PromptExample]:
    from posttrain.data.tasks import builtin_rows

    return [PromptExample(r.prompt, r.chosen, r.source, r.row, {**r.extras, "solution": r.chosen})
            for r in builtin_rows(name, split)]


def _read_examples(path: str, fmt: str, split: str, config: Optional[str]) -> tuple[list[PromptExample], list[InvalidRow]]:
    def choose(record, source, number):
        return PROMPT_FORMATS[detect_prompt_format(record, source, number) if fmt == "auto" else fmt]

    return parse_records(path, split, choose, "prompts", config=config)


def load_prompt_examples(path: str, fmt: str = "auto", split: str = "train", start: int = 0,
                         limit: Optional[int] = None, invalid_rows: str = "error",
                         skipped_path: Optional[Path] = None,
                         what: str = "prompt data", config: Optional[str] = None) -> tuple[list[PromptExample], int]:
    """Read and validate every row of `path` (or a "builtin:<task>"); returns (examples, number of skipped
    rows). `invalid_rows`: "error" raises a DataError naming the first bad row's file, row and field; "skip"
    leaves bad rows out, logs them and appends them to `skipped_path`. `what` names the data in messages."""
    if fmt != "auto" and fmt not in PROMPT_FORMATS:
        hint = difflib.get_close_matches(fmt, list(PROMPT_FORMATS), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise RecipeError(f"{what}: unknown prompt format {fmt!r}.{extra} Formats: auto, {', '.join(PROMPT_FORMATS)}.")
    if invalid_rows not in ("error", "skip"):
        raise RecipeError(f"{what}: invalid_rows must be 'error' or 'skip', got {invalid_rows!r}.")
    if start < 0 or (limit is not None and limit < 1):
        raise RecipeError(f"{what}: start must be >= 0 and limit >= 1 (or null), got start={start}, limit={limit}.")
    if path.startswith("builtin:"):
        examples, invalid = _builtin_examples(path.removeprefix("builtin:"), split), []
    else:
        examples, invalid = _read_examples(path, fmt, split, config)
    handle_invalid(invalid, invalid_rows, what)
    write_skipped_rows(invalid, skipped_path, what)
    examples = examples[start:] if limit is None else examples[start:start + limit]
    if not examples:
        raise DataError(f"{what}: no usable prompts in {path} ({len(invalid)} invalid rows, start={start}). Check "
                        f"the file, its fields and `start`.")
    return examples, len(invalid)
