"""`posttrain eval --generate` (greedy pass@1, pass@k, maj@k with the math reward) and the lm-evaluation-harness task
of `posttrain lm-eval-task`: a LoRA adapter on SmolLM2 scored by lm-eval (its own `hf` model with `peft=`) and by
posttrain on the same prompts gives the same completions and the same score."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import perturbed_lora_adapter
from posttrain import cli
from posttrain.eval.generate import majority_success, pass_at_k
from posttrain.rollout import RolloutRecord

ROOT = Path(__file__).resolve().parents[1]


def _brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("outcomes", [[True, False, False, False], [False] * 5, [True] * 3 + [False] * 3,
                                      [False, True, False, True, False, False, True, False]])
def test_pass_at_k_is_the_probability_that_a_k_subset_holds_a_correct_sample(outcomes):
    for k in range(1, len(outcomes) + 1):
        assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(_brute_pass_at_k(outcomes, k), abs=1e-12)


def _record(answer, success):
    return RolloutRecord(0, 0, [], [], False, "", float(success), answer=answer, success=success)


def test_majority_vote_takes_the_most_frequent_answer_and_the_first_seen_on_a_tie():
    assert majority_success([_record("3", False), _record("4", True), _record("4", True), _record(None, False)])
    assert not majority_success([_record("3", False), _record("3", False), _record("4", True)])
    assert not majority_success([_record("3", False), _record("4", True)])  # a tie: "3" came first
    assert majority_success([_record(None, False), _record("4", True), _record("3", False)])
    assert not majority_success([_record(None, False)])


@pytest.mark.slow
def test_lm_eval_scores_an_adapter_as_posttrain_does_and_pass_at_k_follows_the_samples(smollm2_dir, tmp_path):
    adapter = perturbed_lora_adapter(smollm2_dir, tmp_path / "adapter")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--builtin", "addition", "--max-prompts", "10", "--max-new-tokens", "16"]
    assert cli.main(["lm-eval-task", *common, "--output", str(tmp_path / "task")]) == 0
    # posttrain's eval and the harness run side by side (one thread each)
    ours = subprocess.Popen([sys.executable, "-m", "posttrain", "eval", "--generate", *common, "--format", "chat",
                             "--adapter", str(adapter), "--model", str(smollm2_dir), "--samples", "4", "--threads",
                             "1", "--output", str(tmp_path / "ours")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    theirs = subprocess.Popen(["lm-eval" if not (Path(sys.executable).parent / "lm-eval").exists()
                               else str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "hf",
                               "--model_args", f"pretrained={smollm2_dir},peft={adapter},dtype=float32",
                               "--include_path", str(tmp_path / "task"), "--tasks", "posttrain_local",
                               "--apply_chat_template", "--batch_size", "10", "--log_samples",
                               "--output_path", str(tmp_path / "lm_eval")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    ours_out, ours_err = ours.communicate(timeout=600)
    theirs_err = theirs.communicate(timeout=600)[1]
    assert ours.returncode == 0, ours_err
    assert theirs.returncode == 0, theirs_err[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ours" / "completions.jsonl").read_text().splitlines()]
    greedy = [r for r in records if r["kind"] == "greedy"]
    [samples_file] = list((tmp_path / "lm_eval").glob("*/samples_posttrain_local_*.jsonl"))
    harness = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc"]["prompt"] for s in harness] == [r["prompt"] for r in greedy]
    assert [s["resps"][0][0] for s in harness] == [r["completion"] for r in greedy]  # the same greedy completions
    assert [bool(s["exact_match"]) for s in harness] == [r["success"] for r in greedy]
    [results_file] = list((tmp_path / "lm_eval").glob("*/results_*.json"))
    harness_score = json.loads(results_file.read_text())["results"]["posttrain_local"]["exact_match,last_number"]
    report = json.loads((tmp_path / "ours" / "report.json").read_text())["metrics"]
    assert report["pass@1"] == pytest.approx(harness_score, abs=1e-12)
    assert 0 < report["pass@1"] < 1  # the prompts separate right from wrong answers
    by_prompt: dict[int, list[dict]] = {}
    for r in records:
        if r["kind"] == "sample":
            by_prompt.setdefault(r["row"], []).append(r)
    assert len(by_prompt) == 10 and all(len(v) == 4 for v in by_prompt.values())
    for k in (2, 4):
        expected = sum(_brute_pass_at_k([r["success"] for r in v], k) for v in by_prompt.values()) / 10
        assert report[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    votes = 0
    for v in by_prompt.values():
        answers = [r["extracted"] for r in v if r["extracted"] is not None]
        if answers:
            top = max(Counter(answers).values())
            winner = next(a for a in answers if Counter(answers)[a] == top)
            votes += next(r["success"] for r in v if r["extracted"] == winner)
    assert report["maj@4"] == pytest.approx(votes / 10, abs=1e-12)
    assert report["pass@1_sampled"] == pytest.approx(sum(r["success"] for v in by_prompt.values() for r in v) / 40)
    assert "greedy pass@1" in ours_out and "maj@4" in ours_out
