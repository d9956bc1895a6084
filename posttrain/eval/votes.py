"""Preference probabilities alpha (share of raters preferring the chosen response) for R*.

Where the data has annotator votes, alpha comes from them:
- PandaLM (`instruction`, `input`, `response1`, `response2`, `label_0`, `label_1`, `label_2`; votes
  1 / 2 for a response, 0 for a tie). The majority vote picks the chosen response; alpha is the
  share of the three votes that went to it (2/3 or 1). Pairs whose majority vote is a tie, or that
  have no majority at all, are excluded from every number and counted.
- Any other file: a numeric `alpha` field on a row (kept by the readers as an extra).
Otherwise alpha is the default (1, with the eps rule of spec section 11).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from posttrain.data.readers import PreferenceRow
from posttrain.errors import DataError

_VOTE_KEY = re.compile(r"^(label_\d+|annotator\d+)$")


@dataclass
class VoteStats:
    rows: int = 0
    kept: int = 0
    majority_tie: int = 0  # excluded: the majority said "similar quality"
    no_majority: int = 0  # excluded: three different votes
    unusable: int = 0  # excluded: an empty response, or two identical responses
    alpha_counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "excluded_majority_tie": self.majority_tie,
                "excluded_no_majority": self.no_majority, "excluded_unusable": self.unusable,
                "alpha_counts": self.alpha_counts}


def _first_record(path: Path) -> Optional[dict]:
    if path.is_dir() or path.suffix.lower() not in (".json", ".jsonl"):
        return None
    text = path.read_text(encoding="utf-8-sig").lstrip()
    try:
        if text.startswith("["):
            records = json.loads(text)
            return records[0] if records and isinstance(records[0], dict) else None
        first = text.split("\n", 1)[0]
        record = json.loads(first)
        return record if isinstance(record, dict) else None
    except (json.JSONDecodeError, IndexError):
        return None


def is_pandalm(path: str) -> bool:
    record = _first_record(Path(path))
    return bool(record) and {"response1", "response2", "instruction"} <= set(record) and \
        any(_VOTE_KEY.match(k) for k in record)


def _records(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _vote(value, source: str, row: int) -> int:
    try:
        vote = int(str(value).strip())
    except ValueError:
        vote = -1
    if vote not in (0, 1, 2):
        raise DataError(f"{source}, row {row}: annotator vote {value!r} is not 0 (tie), 1 or 2.")
    return vote


def pandalm_rows(path: str) -> tuple[list[PreferenceRow], VoteStats]:
    """PandaLM-format pairs oriented by the majority vote, with `alpha` and the votes in extras.

    The prompt is the instruction (and the input after a blank line); responses get a leading space,
    so that with the plain format prompt + response is Chen et al.'s f"{input} {output}".
    """
    p = Path(path)
    stats = VoteStats()
    rows = []
    for number, record in enumerate(_records(p), start=1):
        stats.rows += 1
        source = str(p)
        keys = sorted(k for k in record if _VOTE_KEY.match(k))
        if not keys:
            raise DataError(f"{source}, row {number}: no annotator votes (label_0, label_1, ...).")
        votes = [_vote(record[k], source, number) for k in keys]
        counts = Counter(votes)
        top, top_count = counts.most_common(1)[0]
        if top_count * 2 <= len(votes):
            stats.no_majority += 1
            continue
        if top == 0:
            stats.majority_tie += 1
            continue
        first, second = str(record["response1"]), str(record["response2"])
        chosen, rejected = (first, second) if top == 1 else (second, first)
        if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            stats.unusable += 1
            continue
        alpha = counts[top] / len(votes)
        prompt = str(record["instruction"]).strip()
        if str(record.get("input") or "").strip():
            prompt = f"{prompt}\n\n{str(record['input']).strip()}"
        extras = {"alpha": alpha, "votes": votes, "index": record.get("index")}
        rows.append(PreferenceRow(prompt, " " + chosen.strip(), " " + rejected.strip(), source, number, extras))
        stats.kept += 1
        key = f"{alpha:.4g}"
        stats.alpha_counts[key] = stats.alpha_counts.get(key, 0) + 1
    return rows, stats


def pair_alpha(extras: dict, default: float) -> float:
    """alpha of one pair: its `alpha` extra where present, else `default`."""
    value = (extras or {}).get("alpha")
    if value is None:
        return float(default)
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise DataError(f"alpha {value!r} is not a number") from None
    if not 0 < alpha <= 1:
        raise DataError(f"alpha {alpha} must be in (0, 1]: the share of raters preferring the chosen response.")
    return alpha
