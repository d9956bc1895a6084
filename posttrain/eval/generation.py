"""Greedy held-out evaluation of online runs: pass@1 and mean reward, every completion written."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional


def greedy_evaluation(collector, examples: list, params, output_dir: Path, step: int,
                      write_report: bool) -> Optional[dict]:
    """Greedy pass@1 (and mean reward) on the held-out prompts, each process generating an equal share;
    with `write_report`, every completion goes to <output_dir>/eval/greedy-step-<step>.jsonl."""
    if not examples:
        return None
    t0 = time.time()
    records = collector.collect(list(range(len(examples))), 1, params)
    n = len(records)
    p = sum(rec.success for rec in records) / n
    result = {"pass@1": p, "pass@1_stderr": math.sqrt(max(p * (1 - p), 0.0) / n), "reward_mean":
              sum(rec.reward for rec in records) / n, "num_prompts": float(n),
              "mean_length": sum(len(rec.completion_ids) for rec in records) / n,
              "truncated_share": sum(rec.truncated for rec in records) / n, "seconds": time.time() - t0}
    if write_report:
        directory = Path(output_dir) / "eval"
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"greedy-step-{step:08d}.jsonl").open("w", encoding="utf-8") as handle:
            for rec in records:
                example = examples[rec.index]
                handle.write(json.dumps({"source": example.source, "row": example.row, "answer": example.answer,
                                         "completion": rec.text, "extracted": rec.answer, "reward": rec.reward,
                                         "success": rec.success, "truncated": rec.truncated}) + "\n")
    return result
